"""Image training runs shared by the image scripts (``experiments/train_images.py``,
``experiments/eval_images.py``, ``experiments/digits_comparison.py``; scripts do not import each
other): a named preset of ``gcflows.presets`` resolved into a validated run
(:func:`resolve_run`), its training images (:func:`load_images`), its model
(:func:`build_model`, :func:`model_from_checkpoint`) and PNG sample grids (:class:`GridCallback`,
:func:`save_image_grid`).

A checkpoint's ``config["model"]`` records how the model was built
(``{"arch": "unet", "unet": <UNet kwargs>, "sigma_data": 0.5, "data": <data set>}``);
:func:`build_model` rebuilds it and :func:`model_from_checkpoint` loads its weights (the
checkpoint's digest is verified when a path is given).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcflows.checks import bad, bad_tensor, choice
from gcflows.consistency import ConsistencyModel
from gcflows.data import IMAGE_SHAPES, get_image_dataset
from gcflows.networks import UNet
from gcflows.presets import IMAGE_PRESETS
from gcflows.processes import get_process
from gcflows.sampling import one_step_sample
from gcflows.training.checkpoint import load_checkpoint, load_weights
from gcflows.training.config import TrainConfig
from gcflows.training.rng import derive_seed

__all__ = [
    "SIGMA_DATA",
    "STREAM_INIT",
    "STREAM_GRID",
    "COUPLINGS",
    "METHOD_TO_COUPLING",
    "ImageRun",
    "parse_overrides",
    "resolve_run",
    "load_images",
    "GridCallback",
    "build_model",
    "model_from_checkpoint",
    "image_grid",
    "save_image_grid",
]

SIGMA_DATA = 0.5  # docs/paper.md Eq. 3
STREAM_INIT = 11  # derive_seed stream of the initial weights
STREAM_GRID = 12  # derive_seed stream of the fixed noise of the sample grids

#: --coupling name -> TrainConfig.method (IC = consistency training with independent pairs).
COUPLINGS = {"ic": "ct", "ot": "ot", "gc": "gc"}
METHOD_TO_COUPLING = {v: k for k, v in COUPLINGS.items()}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# fields set from the preset / the script's flags, never by key=value
_RESERVED = {"preset", "model", "data_shape", "dropout", "out_dir"}


@dataclass
class ImageRun:
    """A resolved image run: preset name, data set, validated config (per-process batch) and the
    U-Net keyword arguments. ``global_batch`` = ``config.batch_size * world_size``."""

    preset: str
    data: str
    config: TrainConfig
    network: dict[str, Any]
    world_size: int
    global_batch: int

    @property
    def coupling(self) -> str:
        return METHOD_TO_COUPLING[self.config.method]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return IMAGE_SHAPES[self.data]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``["lr=2e-4", "net.dropout=0.1"]`` -> (TrainConfig overrides, U-Net overrides).

    Values are parsed as JSON (numbers, lists, true / false / null), otherwise kept as strings.
    Unknown keys raise ``ValueError`` listing the accepted ones.
    """
    train_over: dict[str, Any] = {}
    net_over: dict[str, Any] = {}
    net_keys = set(inspect.signature(UNet).parameters)
    for item in items:
        if "=" not in item:
            raise bad("override", item, "write it as key=value (e.g. lr=2e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text.strip())
        if key.startswith("net."):
            name = key[4:]
            if name not in net_keys:
                fix = f"unknown U-Net field {name!r}; known: {sorted(net_keys)}"
                raise bad("override", item, fix)
            net_over[name] = value
        elif key in _RESERVED:
            fix = (
                f"{key!r} cannot be overridden (it is set from --preset / --out; for the dropout "
                "use net.dropout=...)"
            )
            raise bad("override", item, fix)
        elif key in _TRAIN_FIELDS:
            train_over[key] = value
        else:
            known = sorted(_TRAIN_FIELDS - _RESERVED)
            fix = (
                f"unknown key {key!r}: use a TrainConfig field ({', '.join(known)}) "
                "or net.<U-Net argument>"
            )
            raise bad("override", item, fix)
    return train_over, net_over


def resolve_run(
    preset: str,
    *,
    coupling: str | None = None,
    mu: float | None = None,
    overrides: Sequence[str] = (),
    seed: int | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | None = None,
    world_size: int = 1,
) -> ImageRun:
    """Preset + flags + ``key=value`` overrides -> a validated :class:`ImageRun`.

    Raises ``ValueError`` for an unknown preset / coupling / key, a bad value (via ``TrainConfig``),
    a global batch not divisible by ``world_size``, or a U-Net whose input does not match the
    preset's image size.
    """
    choice(preset, "preset", sorted(IMAGE_PRESETS))
    spec = copy.deepcopy(IMAGE_PRESETS[preset])
    data, train_kw, network = spec["data"], spec["train"], spec["network"]
    train_over, net_over = parse_overrides(overrides)
    train_kw.update(train_over)
    network.update(net_over)
    if coupling is not None:
        choice(coupling, "coupling", list(COUPLINGS))
        train_kw["method"] = COUPLINGS[coupling]
    if train_kw.get("method") not in METHOD_TO_COUPLING:
        fix = f"use one of {sorted(METHOD_TO_COUPLING)} for image training (ct = IC)"
        raise bad("method", train_kw.get("method"), fix)
    if mu is not None:
        train_kw["mu"] = mu
    if seed is not None:
        train_kw["seed"] = seed
    if device is not None:
        train_kw["device"] = device
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise bad("world_size", world_size, "use a positive int")
    global_batch = train_kw.get("batch_size")
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise bad("batch_size", global_batch, "use a positive int (the global batch)")
    if global_batch % world_size:
        fix = (
            f"the global batch is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size}"
        )
        raise bad("batch_size", global_batch, fix)
    train_kw["batch_size"] = global_batch // world_size
    shape = IMAGE_SHAPES[data]
    net_shape = (network.get("in_channels"), network.get("image_size"), network.get("image_size"))
    if net_shape != shape:
        fix = (
            f"preset {preset!r} trains on {data} images of shape {shape} (C, H, W): wrong image "
            "size for the preset; drop the net.in_channels / net.image_size override or use a "
            "preset made for this data"
        )
        raise bad("(net.in_channels, net.image_size, net.image_size)", net_shape, fix)
    if "dropout" in network and float(network["dropout"]) > 0 and train_kw["method"] == "gc":
        print(
            f"note: GC with dropout {network['dropout']} (the paper trains GC with dropout 0; "
            "set net.dropout=0 to match)",
            file=sys.stderr,
        )
    network = json.loads(json.dumps(network))  # tuples -> lists, as stored in the checkpoint
    model_record = {"arch": "unet", "unet": network, "sigma_data": SIGMA_DATA, "data": data}
    config = TrainConfig(
        **train_kw,
        preset=preset,
        model=model_record,
        dropout=float(network.get("dropout", 0.0)),
        data_shape=shape,
        out_dir=None if out_dir is None else str(out_dir),
    )
    return ImageRun(preset, data, config, network, int(world_size), global_batch)


def load_images(
    data: str, data_root: str | os.PathLike | None, split: str = "train"
) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in [-1, 1] of ``data`` (digits are bundled; MNIST / CIFAR-10 come
    from ``data_root`` and raise ``FileNotFoundError`` with instructions when missing)."""
    if data != "digits" and data_root is None:
        fix = (
            f"the {data} presets need --data-root: the folder holding the {data} files (gcflows "
            "never downloads data; see gcflows.data for the accepted layouts)"
        )
        raise bad("data_root", data_root, fix)
    images, _ = get_image_dataset(data, root=data_root, split=split)
    return images


# ------------------------------------------------------------------------------------------------
# sample grids
# ------------------------------------------------------------------------------------------------
class GridCallback:
    """Training callback: on ``sample_every`` steps, rank 0 writes one-step samples of the EMA
    model from a fixed noise draw (seeded by ``(seed, grid stream)``, identical at every save) as
    ``run_dir/samples/grid_<step>.png``. The training RNG streams are not touched. Called with
    the ``gcflows.training.StepInfo`` of each step (not imported here: the training loop sits at
    the same sub-layer)."""

    def __init__(self, config: TrainConfig, shape: tuple[int, ...]) -> None:
        self.config = config
        self.shape = tuple(shape)
        self.process = get_process(config.process, t_min=config.t_min, t_max=config.t_max)
        self.paths: list[Path] = []

    def noise(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.config.seed, STREAM_GRID))
        n = self.config.sample_count
        return torch.randn((n, *self.shape), generator=gen).to(device=device, dtype=dtype)

    def __call__(self, info: Any) -> bool:
        if info.rank != 0 or info.run_dir is None or not info.sample_due:
            return False
        p = next(info.ema_model.parameters())
        samples = one_step_sample(info.ema_model, self.noise(p.device, p.dtype), self.process)
        path = Path(info.run_dir) / "samples" / f"grid_{info.step:08d}.png"
        self.paths.append(save_image_grid(samples, path))
        return False


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
        raise bad_tensor(x, "images", "use shape (N, 1 or 3, H, W)")
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
