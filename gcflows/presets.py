"""Named image-training presets: the data set, ``TrainConfig`` overrides and the U-Net config.

Each entry of :data:`IMAGE_PRESETS` is a plain dict (no imports, no code)::

    {"data": "digits" | "mnist" | "cifar10",   # gcflows.data.get_image_dataset name
     "train": {...},                           # keyword overrides of gcflows.training.TrainConfig
     "network": {...}}                         # keyword arguments of gcflows.networks.UNet

``experiments/train_images.py`` builds ``TrainConfig(**train, preset=name, ...)`` and
``ConsistencyModel(UNet(**network), VEProcess(t_min, t_max), sigma_data=0.5)``.
``train["batch_size"]`` is the **global** batch: under torchrun the script gives each of the N
processes ``batch_size / N`` rows (docs/paper.md section 5 states the global batch, 512).

- ``cifar10_base`` / ``cifar10_ot`` / ``cifar10_gc_mix50``: docs/paper.md section 5 (iCT on CIFAR-10
  with the independent, the batch-OT and the generator-induced coupling, mu = 0.5): U-Net of 128
  base channels, multipliers [1, 2, 2], 3 residual blocks per level, attention at 16x16; dropout
  0.3 for IC and 0 for GC (the paper states no value for batch-OT: 0.3, as for the other CT
  baseline, is our choice); Lion, lr 1e-4, global batch 512, 100k steps, EMA 0.9999 (the EMA
  model is the GC generator), VE sigma in [0.002, 80], curriculum s0 = 10, s1 = 1280, lognormal
  index sampling (P_mean -1.1, P_std 2.0), pseudo-Huber on the whole vector.
- ``digits_base`` / ``digits_ot`` / ``digits_gc_mix50``: the same three objectives scaled down to
  the 8x8 scikit-learn digits so that one CPU core trains one model in about two minutes: a
  U-Net of 16 base channels, multipliers [1, 2], one block per level, no attention; Adam lr
  1e-3, batch 64, 3000 steps, EMA 0.995, s1 = 160 (a shorter run needs a shorter curriculum;
  lr 2e-3 and EMA 0.999 were worse in a 3000-step probe). Everything else (process, sigma
  range, index sampling, distance) as for CIFAR-10.
- ``digits_tiny``: a few-second configuration for smoke tests (8 base channels, 50 steps).
"""

from __future__ import annotations

__all__ = ["IMAGE_PRESETS"]

_CIFAR10_TRAIN = {
    "batch_size": 512,
    "total_steps": 100_000,
    "optimizer": "lion",
    "lr": 1e-4,
    "ema_decay": 0.9999,
    "ema_warmup": True,  # the authors' ema-pytorch warm-up (docs/paper.md section 5)
    "ema_every": 5,
    "process": "ve",
    "t_min": 0.002,
    "t_max": 80.0,
    "s0": 10,
    "s1": 1280,
    "p_mean": -1.1,
    "p_std": 2.0,
    "rho": 7.0,
    "distance": "pseudo_huber",
    "device": "auto",
    "log_every": 100,
    "checkpoint_every": 5000,
    "sample_every": 5000,
    "sample_count": 64,
}

_CIFAR10_NET = {
    "in_channels": 3,
    "base_channels": 128,
    "channel_mults": [1, 2, 2],
    "num_blocks": 3,
    "attn_resolutions": [16],
    "image_size": 32,
}

_DIGITS_TRAIN = {
    "batch_size": 64,
    "total_steps": 3000,
    "optimizer": "adam",
    "lr": 1e-3,
    "ema_decay": 0.995,
    "process": "ve",
    "t_min": 0.002,
    "t_max": 80.0,
    "s0": 10,
    "s1": 160,
    "p_mean": -1.1,
    "p_std": 2.0,
    "rho": 7.0,
    "distance": "pseudo_huber",
    "device": "cpu",
    "log_every": 100,
    "checkpoint_every": 1000,
    "sample_every": 500,
    "sample_count": 100,
}

_DIGITS_NET = {
    "in_channels": 1,
    "base_channels": 16,
    "channel_mults": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [],
    "image_size": 8,
    "num_groups": 8,
}

#: name -> {"data", "train", "network"}; see the module docstring.
IMAGE_PRESETS: dict[str, dict] = {
    "cifar10_base": {
        "data": "cifar10",
        "train": {**_CIFAR10_TRAIN, "method": "ct"},
        "network": {**_CIFAR10_NET, "dropout": 0.3},
    },
    "cifar10_ot": {
        "data": "cifar10",
        "train": {**_CIFAR10_TRAIN, "method": "ot"},
        "network": {**_CIFAR10_NET, "dropout": 0.3},
    },
    "cifar10_gc_mix50": {
        "data": "cifar10",
        "train": {**_CIFAR10_TRAIN, "method": "gc", "mu": 0.5},
        "network": {**_CIFAR10_NET, "dropout": 0.0},
    },
    "digits_base": {
        "data": "digits",
        "train": {**_DIGITS_TRAIN, "method": "ct"},
        "network": {**_DIGITS_NET, "dropout": 0.0},
    },
    "digits_ot": {
        "data": "digits",
        "train": {**_DIGITS_TRAIN, "method": "ot"},
        "network": {**_DIGITS_NET, "dropout": 0.0},
    },
    "digits_gc_mix50": {
        "data": "digits",
        "train": {**_DIGITS_TRAIN, "method": "gc", "mu": 0.5},
        "network": {**_DIGITS_NET, "dropout": 0.0},
    },
    "digits_tiny": {
        "data": "digits",
        "train": {
            **_DIGITS_TRAIN,
            "method": "ct",
            "batch_size": 16,
            "total_steps": 50,
            "s1": 20,
            "ema_decay": 0.9,
            "log_every": 10,
            "checkpoint_every": 25,
            "sample_every": 25,
            "sample_count": 16,
        },
        "network": {**_DIGITS_NET, "base_channels": 8, "num_groups": 4, "dropout": 0.0},
    },
}
