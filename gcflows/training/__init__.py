"""Training of consistency models: CT, CD, batch-OT and GC (docs/paper.md section 2).

One loop serves the toy (2D) and the image experiments. The loss of every step is
:class:`gcflows.consistency.ConsistencyObjective` (CT Eq. 6, CD Eq. 4-5, batch-OT, GC Eq. 13-15
with the per-sample mixing of Eq. 21); this package adds what a run needs around it, one module
per concept:

- ``config``: :class:`TrainConfig`, validated at construction, with a JSON round trip; its
  objective fields are handed to the loss whole (``config.objective``);
- ``step``: THE training step :func:`train_step` (data draw -> coupling + loss -> optimiser ->
  EMA) and the objective / optimiser / EMA factories. The EMA (:class:`gcflows.ema.EMA`: a plain
  EMA, or the authors' rule with ``ema_warmup``) is the GC model (docs/paper.md section 5: "the
  EMA model as GC generator") unless a frozen ``gc_model`` is passed;
- ``checkpoint``: atomic checkpoints with a SHA-256 digest verified on every load, the previous
  checkpoint kept as ``checkpoint.prev.pt``, resume compatibility;
- ``distributed``: DDP under ``torchrun`` and the global-batch OT coupling;
- ``rundir``: ``config.json``, ``metrics.jsonl`` and samples of a run folder;
- ``rng``: the seeded random streams and their checkpointed states;
- ``batches``: minibatches from a sampler or a tensor;
- ``loop``: :func:`train`, which ties them together (exact resume, NaN stop, SIGINT / SIGTERM);
- ``images``: the U-Net image models of ``experiments/train_images.py`` and PNG sample grids.

docs/reliability.md says what runs are guaranteed (atomicity, digests, resume, interrupts).
"""

from gcflows.atomic import atomic_write_bytes
from gcflows.training.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CorruptCheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_payload,
    load_weights,
    save_checkpoint,
)
from gcflows.training.config import (
    DISTANCES,
    METHODS,
    OPTIMIZERS,
    TrainConfig,
    config_fingerprint,
)
from gcflows.training.distributed import distributed_ot_coupling
from gcflows.training.loop import (
    NonFiniteLossError,
    StepInfo,
    TrainingInterrupted,
    TrainResult,
    train,
)
from gcflows.training.rng import derive_seed
from gcflows.training.step import (
    StepOutput,
    TrainState,
    build_optimizer,
    make_ema,
    make_objective,
    train_step,
    update_ema,
    without_input_checks,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "StepInfo",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "CorruptCheckpointError",
    "train",
    "train_step",
    "TrainState",
    "StepOutput",
    "make_objective",
    "distributed_ot_coupling",
    "build_optimizer",
    "make_ema",
    "update_ema",
    "without_input_checks",
    "config_fingerprint",
    "save_checkpoint",
    "load_checkpoint",
    "load_payload",
    "load_weights",
    "find_checkpoint",
    "atomic_write_bytes",
    "derive_seed",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "METHODS",
    "OPTIMIZERS",
    "DISTANCES",
]
