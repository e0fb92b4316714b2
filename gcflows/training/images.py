"""Image models of ``experiments/train_images.py`` and PNG sample grids, shared with
``experiments/eval_images.py`` (scripts do not import each other).

A checkpoint's ``config["model"]`` records how the model was built
(``{"arch": "unet", "unet": <UNet kwargs>, "sigma_data": 0.5, "data": <data set>}``);
:func:`build_model` rebuilds it and :func:`model_from_checkpoint` loads its weights (the
checkpoint's digest is verified when a path is given).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcflows.consistency import ConsistencyModel
from gcflows.networks import UNet
from gcflows.processes import get_process
from gcflows.training.checkpoint import load_checkpoint, load_weights
from gcflows.training.config import TrainConfig
from gcflows.training.rng import derive_seed

__all__ = [
    "SIGMA_DATA",
    "STREAM_INIT",
    "build_model",
    "model_from_checkpoint",
    "image_grid",
    "save_image_grid",
]

SIGMA_DATA = 0.5  # docs/paper.md Eq. 3
STREAM_INIT = 11  # derive_seed stream of the initial weights


def build_model(config: TrainConfig, seed: int | None = None) -> ConsistencyModel:
    """``ConsistencyModel(UNet(**config.model["unet"]), process, sigma_data)``, its weights drawn
    from a seed derived from ``seed`` (default ``config.seed``) without touching the caller's
    global RNG."""
    record = config.model
    if record.get("arch") != "unet" or "unet" not in record:
        raise ValueError(
            f"config.model {record!r} does not describe a U-Net image model; it was not written "
            "by experiments/train_images.py"
        )
    process = get_process(config.process, t_min=config.t_min, t_max=config.t_max)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed if seed is None else seed, STREAM_INIT))
        backbone = UNet(**record["unet"])
    sigma_data = float(record.get("sigma_data", SIGMA_DATA))
    return ConsistencyModel(backbone, process, sigma_data=sigma_data)


def model_from_checkpoint(
    checkpoint: dict[str, Any] | str | os.PathLike, which: str = "ema"
) -> ConsistencyModel:
    """The ``"ema"`` (default) or ``"model"`` network of a checkpoint written by
    ``experiments/train_images.py`` (a dict from ``load_checkpoint`` or a path), in eval mode."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    model = build_model(TrainConfig.from_dict(ckpt["config"]))
    load_weights(model, ckpt, which=which)
    return model.eval()


def image_grid(
    images: torch.Tensor, nrow: int | None = None, scale: int = 1, pad: int | None = None
) -> np.ndarray:
    """Tile ``images (N, C, H, W)`` (values clipped to [-1, 1], mapped to 0..255) into a uint8
    array ``(rows (H' + pad) + pad, cols (W' + pad) + pad[, 3])`` with mid-grey separators of
    ``pad`` pixels (default ``max(1, scale // 2)``), each pixel repeated ``scale`` times (nearest
    neighbour, ``H' = scale H``) so that 8x8 digits stay legible."""
    pad = max(1, scale // 2) if pad is None else int(pad)
    x = images.detach().float().cpu().clamp(-1.0, 1.0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    ncol = nrow or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncol)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    arr = grid[0] if c == 1 else grid.permute(1, 2, 0)
    return np.ascontiguousarray(arr.numpy())  # Pillow misreads strided views


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, **kw: Any) -> Path:
    """Write :func:`image_grid` as a PNG (Pillow, installed with matplotlib: ``gcflows[plot]``)."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("saving PNG grids needs Pillow: pip install 'gcflows[plot]'") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    default_scale = max(1, 64 // int(images.shape[-1]))  # 8x8 digits -> 8x upscaling
    Image.fromarray(image_grid(images, scale=kw.pop("scale", default_scale), **kw)).save(path)
    return path
