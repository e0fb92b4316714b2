"""Train an ensemble of seeds of a small consistency model in one vectorized step.

S seeds of ``ConsistencyModel(ToyMLP)`` on a Gaussian-mixture target are trained at once, as one
network with grouped layers (:func:`stack_seeds`): every ``nn.Linear`` becomes a
:class:`SeedStackedLinear` holding the S seeds' weights ``(S, out, in)`` and applying them to
seed-major rows in one ``torch.baddbmm``, while the rest of ``ToyMLP`` and of the preconditioning
(row-wise operations) runs unchanged on the ``S * B`` rows. A step therefore costs the Python and
dispatch overhead of one seed. The loss is the sum of the per-seed losses, so each seed's slice of
the gradient is its own gradient, and Adam (elementwise; one fused kernel over the stacked
weights) updates every slice as it would update that seed alone. There is no gradient clipping
and no weight decay here; either would have to be computed per seed (a global-norm clip over the
stacked weights would couple the seeds).

Image backbone (``EnsembleSpec(backbone="unet")``): ``ConsistencyModel(RowsAsImages(UNet))``, the
U-Net of the digits presets by default (``gcflows.presets``), reading each ``C*H*W``-row as a
``(C, H, W)`` image (the same preconditioning as the image training: VE, ``sigma_data``,
``c_noise = log(sigma) / 4``). Its seeds are stacked by :func:`map_seeds`: the backbone becomes a
:class:`SeedMap`, which keeps the ``(S, ...)`` parameters under the single-seed names and runs
``functional_call(...)`` per seed on its rows: in a loop over the seeds (``seed_map="loop"``, the
default: the faster on a CPU, docs/performance.md "U-Net seed ensemble") or under
``torch.func.vmap`` (``"vmap"``: convolutions become grouped convolutions). The U-Net's
convolutions dominate a step, so either costs about what training the seeds one by one costs;
what the ensemble adds is one optimizer step and one evaluation call for all seeds. Everything
else above holds as for the MLP.

Per-seed RNG streams: seed ``s`` owns ``torch.Generator().manual_seed(s)`` and draws, at every
step and in this order, exactly what :class:`gcflows.consistency.ConsistencyObjective` draws for a
single run: the data (``target.sample``), the noise, the interval indices, then the GC mask. Its
initial weights come from ``torch.manual_seed(s)``. So seed ``s`` of an ensemble equals a plain
run of the library objective with that seed (:func:`train_sequential`), to float tolerance (the
test asserts it); only the arithmetic is batched. The random calls run seed after seed (in a
background thread by default, overlapping the previous step's arithmetic); the mixture's
arithmetic on the draws and everything after them run for all seeds at once.

Methods (docs/paper.md section 2): ``cd`` (one Euler step of the exact velocity of the target),
``ct`` (IC), ``ot`` (exact batch-OT, per seed, on the CPU), ``gc`` with probability ``mu`` per
row and a ``gc_model`` of:

- ``"ema"``: the warm-up EMA of the authors (``gcflows.ema``: beta 0.9999, every 5 steps),
- ``"const_ema"``: a constant-decay EMA updated every step (beta 0.9999 unless set),
- ``"online"``: the online network (under stop-gradient),
- ``"ideal"``: the exact flow map of the target (``GaussianMixture.flow_map``, ``method="rk4"``).

For the vectorized step the GC model runs on every row and the GC rows are selected afterwards
(the library runs it on the GC rows only): the same numbers, row by row.

Recipe options every method shares (:class:`EnsembleSpec`; the convergence study,
docs/convergence.md, uses them):

- ``lr_schedule``: ``"constant"`` or ``"cosine"``; with ``lr_warmup`` steps of linear warm-up,
  the rate at step ``k`` is :func:`learning_rate` (``lr * min(1, (k + 1) / warmup)`` times
  ``(1 + cos(pi k / K)) / 2`` for the cosine, ``K = steps``), set before each Adam step.
- ``curriculum_steps``: the ``K`` of the iCT curriculum (docs/paper.md section 2; default
  ``steps``). ``N(k)`` reaches ``s1`` at about ``K (1 - 1 / (log2(s1 / s0) + 1))``; a larger
  ``K`` than ``steps`` stretches the doubling over a longer virtual run.
- ``eval_ema``: a warm-up EMA kept for evaluation (``Ensemble.eval_ema``), updated after every
  step with decay ``min(eval_ema, 1 - (1 + k)^(-2/3))`` (``gcflows.ema.ema_decay``): an average
  over the last ``~k^(2/3)`` steps, for every method (it never feeds the training, unlike the GC
  generator's EMA).

A non-finite loss of any seed stops the run before the weights are updated, with
``gcflows.training.NonFiniteLossError`` naming the step and the seeds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from gcflows import couplings
from gcflows.checks import bad, is_int, is_real
from gcflows.consistency import (
    METHOD_REGISTRY,
    METHODS,
    ConsistencyModel,
    ConsistencyObjective,
    ObjectiveConfig,
    default_huber_c,
    pseudo_huber,
)
from gcflows.ema import EMA, EMARule
from gcflows.gmm import GaussianMixture
from gcflows.kernels import interpolate_pair
from gcflows.networks import ToyMLP, UNet
from gcflows.presets import IMAGE_PRESETS
from gcflows.training.loop import NonFiniteLossError
from gcflows.velocity import TrueVelocity

__all__ = [
    "EnsembleSpec",
    "Ensemble",
    "SeedStackedLinear",
    "SeedMap",
    "RowsAsImages",
    "stack_seeds",
    "map_seeds",
    "BACKBONES",
    "DIGITS_UNET",
    "make_model",
    "train_ensemble",
    "train_sequential",
    "learning_rate",
    "objective_config",
    "METHODS",
    "GC_MODELS",
    "VARIANTS",
    "LR_SCHEDULES",
]

GC_MODELS = ("ema", "const_ema", "online", "ideal")
#: The named training variants the studies compare: name -> (method, mu, gc_model). ``gc_model``
#: is read by ``gc`` only (docs/highdim.md, docs/convergence.md).
VARIANTS: dict[str, tuple[str, float, str]] = {
    "cd": ("cd", 0.0, "ema"),
    "ct": ("ct", 0.0, "ema"),
    "ot": ("ot", 0.0, "ema"),
    "gc0.3": ("gc", 0.3, "ema"),
    "gc0.5": ("gc", 0.5, "ema"),
    "gc1.0": ("gc", 1.0, "ema"),
    "gc0.5-ideal": ("gc", 0.5, "ideal"),
    "gc0.5-online": ("gc", 0.5, "online"),
    "gc0.5-constema": ("gc", 0.5, "const_ema"),
}
LR_SCHEDULES = ("constant", "cosine")
BACKBONES = ("mlp", "unet")
#: the U-Net of the digits presets (``gcflows.presets``, ``digits_base``): the default of
#: ``EnsembleSpec.unet`` (1 x 8 x 8 images, 16 base channels, no attention, dropout 0)
DIGITS_UNET: dict = dict(IMAGE_PRESETS["digits_base"]["network"])


@dataclass
class EnsembleSpec:
    """One training recipe, shared by every seed of an ensemble.

    ``method``: one of the built-in methods ``consistency.METHODS`` (the vectorized step is
    written for these four; a method added with ``consistency.register_method`` trains through
    ``gcflows.training.train``). The objective is ``consistency.ObjectiveConfig`` with
    ``distance="pseudo_huber"``, ``mu``, ``s0``, ``s1`` and ``total_steps = curriculum_steps or
    steps`` (:func:`objective_config`).

    Names and ``TrainConfig``'s: ``steps`` is ``total_steps``, ``batch`` is ``batch_size``,
    ``ema_beta`` / ``ema_every`` are ``ema_decay`` / ``ema_every`` of the GC generator's EMA
    (``TrainConfig.ema_warmup=True`` for ``gc_model="ema"``), ``lr_warmup`` is ``warmup_steps``;
    ``lr``, ``mu``, ``s0``, ``s1`` are the same. The names stay: ``as_dict()`` is written into
    the run records of the convergence and high-dimensional studies and the benchmarks
    (docs/convergence.md, docs/highdim.md, docs/performance.md), which earlier runs are read
    back and compared with; a rename would split those records in two vocabularies.

    ``sigma_data``: the preconditioning's data standard deviation (per coordinate).
    ``ema_beta`` / ``ema_every``: the EMA used by ``gc_model="ema"`` (warm-up) and
    ``"const_ema"`` (constant, ``const_ema_every``). ``ideal_steps``: RK4 steps of the ideal
    generator. ``s0``, ``s1``: the iCT curriculum over ``curriculum_steps`` (None: ``steps``).
    ``lr_schedule`` / ``lr_warmup``: :func:`learning_rate`. ``eval_ema``: beta of the evaluation
    EMA kept for every method (None: none kept; module docstring). ``backbone``: ``"mlp"``
    (``ToyMLP`` of width ``hidden`` and ``depth``) or ``"unet"`` (``UNet(**unet)``; ``unet=None``
    is :data:`DIGITS_UNET`, 1 x 8 x 8 images; the target's dimension must be ``C*H*W``; dropout
    0). ``seed_map``: how the U-Net's seeds run, :class:`SeedMap`'s ``mode``.
    """

    method: str = "ct"
    mu: float = 0.5
    gc_model: str = "ema"
    steps: int = 1000
    batch: int = 512
    hidden: int = 256
    depth: int = 3
    lr: float = 5e-4
    sigma_data: float = 0.5
    s0: int = 10
    s1: int = 1280
    ema_beta: float = 0.9999
    ema_every: int = 5
    const_ema_every: int = 1
    ideal_steps: int = 16
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    curriculum_steps: int | None = None
    eval_ema: float | None = None
    backbone: str = "mlp"
    unet: dict | None = None
    seed_map: str = "loop"

    def unet_config(self) -> dict:
        """The ``UNet`` arguments of ``backbone="unet"`` (``unet``, or :data:`DIGITS_UNET`)."""
        return dict(DIGITS_UNET if self.unet is None else self.unet)

    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the U-Net's images (``in_channels``, ``image_size`` twice)."""
        cfg = self.unet_config()
        size = int(cfg.get("image_size", 32))
        return (int(cfg.get("in_channels", 3)), size, size)

    def validate(self, dim: int | None = None) -> EnsembleSpec:
        """Check every field (and, with the target's ``dim``, that a U-Net's images hold ``dim``
        values)."""
        if self.backbone not in BACKBONES:
            raise bad("EnsembleSpec.backbone", self.backbone, f"use one of {list(BACKBONES)}")
        if self.seed_map not in SeedMap.MODES:
            raise bad("EnsembleSpec.seed_map", self.seed_map, f"use one of {list(SeedMap.MODES)}")
        if self.unet is not None and (self.backbone != "unet" or not isinstance(self.unet, dict)):
            raise bad("EnsembleSpec.unet", self.unet, "use None, or a dict with backbone='unet'")
        if self.backbone == "unet":
            cfg = self.unet_config()
            if float(cfg.get("dropout", 0.0)) != 0.0:
                fix = "use dropout 0 in a seed ensemble (masks would not follow the seeds' streams)"
                raise bad("EnsembleSpec.unet['dropout']", cfg["dropout"], fix)
            try:
                with torch.device("meta"):
                    UNet(**cfg)
            except (TypeError, ValueError) as err:
                raise bad("EnsembleSpec.unet", self.unet, f"use UNet's arguments ({err})") from None
            if dim is not None and math.prod(self.image_shape()) != dim:
                fix = f"use a target of dim C*H*W = {math.prod(self.image_shape())}"
                raise bad("EnsembleSpec.unet image shape", self.image_shape(), f"{fix}, not {dim}")
        if self.method not in METHODS:
            raise bad("EnsembleSpec.method", self.method, f"use one of {list(METHODS)}")
        if self.gc_model not in GC_MODELS:
            raise bad("EnsembleSpec.gc_model", self.gc_model, f"use one of {list(GC_MODELS)}")
        if not is_real(self.mu) or not 0.0 <= float(self.mu) <= 1.0:
            raise bad("EnsembleSpec.mu", self.mu, "use a probability in [0, 1]")
        ints = ("steps", "batch", "hidden", "depth", "s0", "s1", "ema_every", "const_ema_every")
        for name in (*ints, "ideal_steps"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise bad(f"EnsembleSpec.{name}", v, "use an integer >= 1")
        if self.s0 > self.s1:
            raise bad("EnsembleSpec.s0", self.s0, f"use s0 <= s1 (s1={self.s1})")
        if self.method == "ot" and self.batch < 2:
            raise bad("EnsembleSpec.batch", self.batch, "use >= 2 rows for batch-OT")
        for name in ("lr", "sigma_data"):
            v = getattr(self, name)
            if not is_real(v) or not (math.isfinite(float(v)) and float(v) > 0):
                raise bad(f"EnsembleSpec.{name}", v, "use a finite positive float")
        if not is_real(self.ema_beta) or not 0.0 <= float(self.ema_beta) < 1.0:
            raise bad("EnsembleSpec.ema_beta", self.ema_beta, "use a float in [0, 1) (0.9999)")
        if self.eval_ema is not None and (
            not is_real(self.eval_ema) or not 0.0 <= float(self.eval_ema) < 1.0
        ):
            raise bad("EnsembleSpec.eval_ema", self.eval_ema, "use None or a float in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("EnsembleSpec.lr_schedule", self.lr_schedule, f"use one of {LR_SCHEDULES}")
        if not is_int(self.lr_warmup) or not 0 <= self.lr_warmup < self.steps:
            raise bad("EnsembleSpec.lr_warmup", self.lr_warmup, "use an integer in [0, steps)")
        k = self.curriculum_steps
        if k is not None and (not is_int(k) or k < 1):
            raise bad("EnsembleSpec.curriculum_steps", k, "use None (= steps) or an integer >= 1")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


class RowsAsImages(nn.Module):
    """A image backbone on rows: ``(B, C*H*W)`` rows are read as ``(B, C, H, W)`` images
    (row-major, the layout of ``gcflows.gmm.digits_mixture`` and ``images.reshape(B, -1)``), run
    through ``net(x, c_noise)`` and flattened back. ``ConsistencyModel`` around it applies the
    same preconditioning per row as around the image itself (``c_in``, ``c_skip``, ``c_out`` are
    per sample; ``c_noise = log(sigma) / 4`` as in the image training)."""

    def __init__(self, net: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.net, self.shape = net, tuple(int(v) for v in shape)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], *self.shape), c_noise).reshape(x.shape[0], -1)


def make_model(dim: int, spec: EnsembleSpec, seed: int, check_inputs: bool = True) -> nn.Module:
    """``ConsistencyModel(ToyMLP(dim))`` (``spec.backbone="mlp"``) or
    ``ConsistencyModel(RowsAsImages(UNet(**spec.unet_config())))`` (``"unet"``; ``dim`` must be
    ``C*H*W``) with the initial weights of ``torch.manual_seed(seed)`` (the global RNG is left as
    it was). The VE process and ``spec.sigma_data`` for both."""
    spec.validate(dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if spec.backbone == "unet":
            backbone = RowsAsImages(UNet(**spec.unet_config()), spec.image_shape())
        else:
            backbone = ToyMLP(dim, hidden=spec.hidden, depth=spec.depth)
    return ConsistencyModel(backbone, "ve", spec.sigma_data, check_inputs=check_inputs)


def objective_config(spec: EnsembleSpec) -> ObjectiveConfig:
    """The ``ObjectiveConfig`` of ``spec`` (the one configuration of the library objectives)."""
    return ObjectiveConfig(
        method=spec.method,
        mu=float(spec.mu),
        distance="pseudo_huber",
        s0=spec.s0,
        s1=spec.s1,
        total_steps=spec.curriculum_steps or spec.steps,
        owner="EnsembleSpec",
    )


def _uses_velocity(spec: EnsembleSpec) -> bool:
    """The method's target is the velocity estimator (CD: the exact velocity of the target)."""
    return METHOD_REGISTRY[spec.method].target == "velocity"


def _objective(spec: EnsembleSpec, target: GaussianMixture) -> ConsistencyObjective:
    velocity = TrueVelocity(target, "ve") if _uses_velocity(spec) else None
    return ConsistencyObjective("ve", objective_config(spec), velocity=velocity)


def _ema_settings(spec: EnsembleSpec) -> EMARule:
    """The rule of the EMA that ``spec.gc_model`` uses (``gcflows.ema``: the authors' for
    ``"ema"``, the constant decay for ``"const_ema"``)."""
    if spec.gc_model == "ema":
        return EMARule(spec.ema_beta, spec.ema_every, warmup=True)
    return EMARule(spec.ema_beta, spec.const_ema_every, warmup=False)


def learning_rate(spec: EnsembleSpec, step: int) -> float:
    """Adam's rate for the update of training ``step`` (0-based).

    ``lr * w(k) * c(k)``: ``w(k) = min(1, (k + 1) / lr_warmup)`` (1 without warm-up) and
    ``c(k) = (1 + cos(pi k / K)) / 2`` for ``lr_schedule="cosine"`` (``K = steps``; the last
    step's rate is ``lr (1 + cos(pi (K - 1) / K)) / 2 > 0``), else 1."""
    rate = float(spec.lr)
    if spec.lr_warmup > 0:
        rate *= min(1.0, (step + 1) / spec.lr_warmup)
    if spec.lr_schedule == "cosine":
        rate *= 0.5 * (1.0 + math.cos(math.pi * step / spec.steps))
    return rate


def _set_lr(opt: torch.optim.Optimizer, spec: EnsembleSpec, step: int) -> None:
    if spec.lr_schedule != "constant" or spec.lr_warmup > 0:
        for group in opt.param_groups:
            group["lr"] = learning_rate(spec, step)


def _check_losses(step: int, losses: Tensor, seeds: Sequence[int]) -> None:
    """``NonFiniteLossError`` if a seed's loss is NaN / inf (before any weight is updated)."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        which = [seeds[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise NonFiniteLossError(
            f"training stopped at step {step}: non-finite loss for seeds {which}; the weights "
            "were not updated. Lower lr or check the target",
            step=step,
            last_checkpoint=None,
            last_good_step=step,
        )


def _ideal(target: GaussianMixture, steps: int) -> Callable[[Tensor, Tensor], Tensor]:
    def gc_model(x: Tensor, t: Tensor) -> Tensor:
        return target.flow_map(x, t.to(torch.float64), "ve", method="rk4", steps=steps)

    return gc_model


class SeedStackedLinear(nn.Module):
    """``S`` seeds' ``nn.Linear(n_in, n_out)`` layers applied as one batched matmul.

    ``weight (S, n_out, n_in)`` and ``bias (S, n_out)`` (or None) hold seed ``s``'s layer in slice
    ``s`` (the layout of ``torch.func.stack_module_state``). The input rows are seed-major:
    ``x (S * B, ..., n_in)`` holds seed ``s``'s rows at ``s * B .. (s + 1) * B - 1``, and
    ``y[s B + j] = W_s x[s B + j] + b_s`` for all seeds in one ``torch.baddbmm``
    (``(S, B, n_in) @ (S, n_in, n_out)``). A network made of such layers and of row-wise operations
    therefore runs S seeds on their own batches in one call, with the dispatch cost of one seed.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.dim() != 3 or (bias is not None and bias.shape != weight.shape[:2]):
            raise ValueError(
                f"weight must be (S, n_out, n_in) and bias (S, n_out) or None, got "
                f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
            )
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        s, n_in = self.weight.shape[0], self.weight.shape[2]
        if x.shape[-1] != n_in or x.shape[0] % s:
            raise ValueError(
                f"x must be (S * B, ..., {n_in}) with S = {s} seed-major blocks, got "
                f"{tuple(x.shape)}"
            )
        xs = x.reshape(s, -1, n_in)
        w = self.weight.transpose(1, 2)
        y = torch.bmm(xs, w) if self.bias is None else torch.baddbmm(self.bias[:, None], xs, w)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def stack_seeds(models: Sequence[nn.Module]) -> nn.Module:
    """One module that runs ``len(models)`` same-architecture models on seed-major rows.

    A copy of ``models[0]`` whose ``nn.Linear`` layers become :class:`SeedStackedLinear` layers
    holding every model's weights (``(S, ...)``, named as in the models). The result maps
    ``(S * B, ...)`` inputs (seed ``s`` in rows ``s B .. (s + 1) B - 1``) to ``(S * B, ...)``,
    seed ``s``'s rows by model ``s``. Only networks whose parameters all sit in ``nn.Linear``
    layers and whose other operations act row by row qualify (``ToyMLP`` does; dropout must be
    off, its masks would not follow the seeds' streams); anything else is a ``ValueError``.
    """
    models = list(models)
    stacked = copy.deepcopy(models[0])
    for name, mod in list(stacked.named_modules()):
        if isinstance(mod, nn.Dropout) and mod.p > 0:
            raise bad(f"{name} dropout", mod.p, "use dropout 0 in a seed ensemble")
        if not isinstance(mod, nn.Linear):
            continue
        layers = [m.get_submodule(name) for m in models]
        weight = torch.stack([lay.weight.detach() for lay in layers])
        bias = None if mod.bias is None else torch.stack([lay.bias.detach() for lay in layers])
        parent, _, child = name.rpartition(".")
        setattr(stacked.get_submodule(parent), child, SeedStackedLinear(weight, bias))
    for name, _ in stacked.named_parameters():
        owner = stacked.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, SeedStackedLinear):
            raise bad("models", type(owner).__name__, f"parameter {name!r} is not in an nn.Linear")
    for name, buf in models[0].named_buffers():
        if any(not torch.equal(m.get_buffer(name), buf) for m in models[1:]):
            raise bad("models", name, "buffers must be equal across seeds (they are shared)")
    return stacked


class SeedMap(nn.Module):
    """``S`` same-architecture modules run on seed-major rows, by ``torch.func.vmap`` or a loop.

    Holds every parameter of ``modules[0]`` stacked over the seeds, ``(S, ...)``, under the same
    name (the template's children are copied into this module with their parameters replaced by
    the stacked ones), so ``named_parameters()`` and ``torch.func.functional_call`` with a dict
    of ``(S, ...)`` tensors under the single-seed names work as for :class:`SeedStackedLinear`
    networks. ``forward(x (S * B, ...), *args (S * B, ...))`` reshapes every input to
    ``(S, B, ...)``, maps ``functional_call(template, params_s, (x_s, *args_s))`` over the seed
    axis and returns ``(S * B, ...)``: seed ``s``'s rows by seed ``s``'s weights. ``mode``:
    ``"vmap"`` maps with ``torch.func.vmap`` (a convolution becomes one grouped convolution over
    the seeds), ``"loop"`` calls the template once per seed on its slices of the stacked weights
    (``unbind``: the backward stacks the seeds' gradients). The loop is the faster on a CPU for
    the digits U-Net (docs/performance.md "U-Net seed ensemble": its convolutions are
    compute-bound, and vmap's grouped convolutions and batched reductions cost more than the
    per-seed dispatch they save). Buffers are the template's, shared (checked equal across
    seeds). Dropout must be 0 (its masks would not follow the seeds' random streams).
    """

    MODES = ("loop", "vmap")

    def __init__(self, modules: Sequence[nn.Module], mode: str = "loop") -> None:
        super().__init__()
        modules = list(modules)
        if not modules:
            raise bad("modules", modules, "pass at least one module")
        if mode not in self.MODES:
            raise bad("mode", mode, f"use one of {list(self.MODES)}")
        self.mode = mode
        template = copy.deepcopy(modules[0])
        for name, mod in template.named_modules():
            if isinstance(mod, nn.Dropout) and mod.p > 0:
                raise bad(f"{name} dropout", mod.p, "use dropout 0 in a seed ensemble")
        for name, buf in template.named_buffers():
            if any(not torch.equal(m.get_buffer(name), buf) for m in modules[1:]):
                raise bad("modules", name, "buffers must be equal across seeds (they are shared)")
        names = [n for n, _ in template.named_parameters()]
        for m in modules[1:]:
            if [n for n, _ in m.named_parameters()] != names:
                raise bad("modules", type(m).__name__, "use modules of one architecture")
        # this module's own tree: the template's children (deep copies) with stacked parameters
        for child_name, child in template.named_children():
            self.add_module(child_name, copy.deepcopy(child))
        for name, p in template.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(p.detach().clone()))
        for name in names:
            owner, _, leaf = name.rpartition(".")
            stacked = torch.stack([m.get_parameter(name).detach() for m in modules])
            setattr(self.get_submodule(owner), leaf, nn.Parameter(stacked))
        self.seeds = len(modules)
        self._names = names
        object.__setattr__(self, "_template", template)  # not a submodule: no parameters here

    def _current(self) -> dict[str, Tensor]:
        """The tensors now under the parameter names (``functional_call`` may have swapped them)."""
        out = {}
        for name in self._names:
            owner, _, leaf = name.rpartition(".")
            out[name] = getattr(self.get_submodule(owner), leaf)
        return out

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        s = self.seeds
        if x.shape[0] % s or any(a.shape[0] != x.shape[0] for a in args):
            raise bad("x", tuple(x.shape), f"use (S * B, ...) rows with S = {s} seed-major blocks")
        template = self._template

        def one(params: dict[str, Tensor], xs: Tensor, *rest: Tensor) -> Tensor:
            return functional_call(template, params, (xs, *rest))

        split = [v.reshape(s, -1, *v.shape[1:]) for v in (x, *args)]
        if self.mode == "vmap":
            out = torch.func.vmap(one)(self._current(), *split)
            return out.reshape(-1, *out.shape[2:])
        per_seed = {k: v.unbind(0) for k, v in self._current().items()}
        inputs = [v.unbind(0) for v in split]
        outs = [
            one({k: v[i] for k, v in per_seed.items()}, *(v[i] for v in inputs)) for i in range(s)
        ]
        return torch.cat(outs)


def map_seeds(models: Sequence[nn.Module], mode: str = "loop") -> nn.Module:
    """One module that runs ``len(models)`` same-architecture ``ConsistencyModel`` s (any
    backbone) on seed-major rows: a copy of ``models[0]`` whose backbone is the
    :class:`SeedMap` of the models' backbones (the preconditioning acts row by row and runs once
    on the ``S * B`` rows). Parameter names are the single-seed ones
    (``backbone.net.conv_in.weight`` ``(S, ...)``), as for :func:`stack_seeds`. ``mode``: that
    of :class:`SeedMap`. Dropout must be 0."""
    models = list(models)
    if not models or any(not isinstance(m, ConsistencyModel) for m in models):
        raise bad("models", [type(m).__name__ for m in models], "pass ConsistencyModel s")
    stacked = copy.deepcopy(models[0])
    stacked.backbone = SeedMap([m.backbone for m in models], mode)
    return stacked


@dataclass
class Ensemble:
    """S seeds trained together.

    ``module``: the seed-stacked network (:func:`stack_seeds`); ``params`` / ``ema`` map the
    single-seed parameter names to ``(S, ...)`` tensors (``params`` are ``module``'s own
    parameters, updated in place); ``buffers``: the seeds' buffers stacked ``(S, ...)``.
    ``losses`` / ``pair_costs``: one ``(S,)`` tensor per step (loss; mean ``||data - noise||^2``).
    ``eval_ema``: the evaluation EMA (``spec.eval_ema``; None when not kept), as ``ema``.
    """

    seeds: list[int]
    spec: EnsembleSpec
    dim: int
    module: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    ema: dict[str, Tensor] | None = None
    losses: list[Tensor] = field(default_factory=list)
    pair_costs: list[Tensor] = field(default_factory=list)
    eval_ema: dict[str, Tensor] | None = None

    def apply(self, x: Tensor, t: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """``f_s(x_s, t_s)`` for every seed: ``x (S, B, d)``, ``t (S, B)`` -> ``(S, B, d)``.

        ``weights``: ``(S, ...)`` tensors under the parameter names (e.g. ``ema``) instead of
        ``params``."""
        s = len(self.seeds)
        if x.dim() != 3 or x.shape[0] != s or x.shape[2] != self.dim:
            raise bad("x", tuple(x.shape), f"use shape (S, B, d) = ({s}, B, {self.dim})")
        if tuple(t.shape) != tuple(x.shape[:2]):
            raise bad("t", tuple(t.shape), f"use shape (S, B) = {tuple(x.shape[:2])}")
        flat_x, flat_t = x.reshape(-1, self.dim), t.reshape(-1)
        if weights is None:
            out = self.module(flat_x, flat_t)
        else:
            out = functional_call(self.module, weights, (flat_x, flat_t))
        return out.reshape(x.shape)

    def seed_model(self, i: int, use_ema: bool = False, use_eval_ema: bool = False) -> nn.Module:
        """Seed ``i`` as an ordinary ``ConsistencyModel`` (a copy of its weights, of its GC EMA
        with ``use_ema``, of its evaluation EMA with ``use_eval_ema``)."""
        model = make_model(self.dim, self.spec, self.seeds[i])
        src = self.eval_ema if use_eval_ema else self.ema if use_ema else self.params
        state = {k: v[i].detach().clone() for k, v in src.items()}
        state.update({k: v[i].clone() for k, v in self.buffers.items()})
        model.load_state_dict(state)
        return model


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam over the stacked weights as one fused kernel (torch >= 2.4 on the CPU), else the
    multi-tensor path: per element the arithmetic of the (foreach) Adam of a sequential run
    (to float rounding)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused CPU Adam in this torch
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad("seeds", seeds, "use a non-empty list of distinct integers >= 0")
    return [int(s) for s in seeds]


class _Sampler:
    """Every seed's draws of one step, each from its own generator in the library's order.

    Per seed ``g``: ``target.sample(B, generator=g)`` (component indices by ``multinomial``, then
    standard normals ``(B, d)`` in the mixture's dtype), the noise ``randn (B, d)`` (float32), the
    interval indices (``multinomial`` of the schedule's probabilities), then for ``gc`` the mask
    ``rand (B,) < mu``. Only the random calls run seed by seed, straight into ``(S, ...)``
    buffers; the mixture's arithmetic on them (``mean_k + U_k (sqrt(lam_k) * eps)``, the body of
    ``GaussianMixture.sample``) runs once for all seeds, the rotation grouped by component.
    """

    def __init__(self, target: GaussianMixture, spec: EnsembleSpec) -> None:
        self.target, self.spec = target, spec
        self.weights = target.weights
        self.means = target.means
        # the tensors GaussianMixture.sample draws with (tests/test_ensemble.py compares with it
        # on a rotated mixture)
        lam, self.rot = target.eigen
        self.scale = lam.sqrt()
        isotropic = bool((self.scale == self.scale[:, :1]).all())
        self.row_scale = self.scale[:, 0].contiguous() if isotropic else None

    def __call__(self, probs: Tensor, gens: list[torch.Generator]) -> tuple[Tensor, ...]:
        """``(data, noise, idx, mask)``: ``(S, B, d)`` float32 twice, ``(S, B)`` long, bool."""
        s, b, d = len(gens), self.spec.batch, self.target.dim
        gc = self.spec.method == "gc"
        comp = torch.empty(s, b, dtype=torch.long)
        eps = torch.empty(s, b, d, dtype=self.target.dtype)
        noise = torch.empty(s, b, d)
        idx = torch.empty(s, b, dtype=torch.long)
        u = torch.empty(s, b)
        for i, g in enumerate(gens):
            torch.multinomial(self.weights, b, replacement=True, generator=g, out=comp[i])
            torch.randn(b, d, generator=g, dtype=eps.dtype, out=eps[i])
            torch.randn(b, d, generator=g, out=noise[i])
            torch.multinomial(probs, b, replacement=True, generator=g, out=idx[i])
            if gc:
                torch.rand(b, generator=g, out=u[i])
        data = self._mixture_rows(comp, eps).float()
        if self.spec.method == "ot":  # exact assignment per seed (no random draws)
            for i in range(s):
                noise[i] = couplings.ot_coupling(data[i], noise[i]).noise
        mask = u < float(self.spec.mu) if gc else torch.zeros(s, b, dtype=torch.bool)
        return data, noise, idx, mask

    def _mixture_rows(self, comp: Tensor, eps: Tensor) -> Tensor:
        """``means[c] + U_c (scale[c] * eps)`` row by row, ``(S, B, d)`` in the mixture's dtype.

        The same products and sums as ``GaussianMixture.sample`` (bitwise, but for the rotation,
        whose matrix products sum in another order); an isotropic component's scale multiplies
        as one number per row instead of a gathered ``(S, B, d)`` tensor."""
        if self.row_scale is not None:
            z = eps * self.row_scale[comp][..., None]
        else:
            z = eps * self.scale[comp]
        if self.rot is not None:  # rows sorted by component: one product per component
            flat_c = comp.reshape(-1)
            order = torch.argsort(flat_c, stable=True)
            by_comp = z.reshape(-1, z.shape[-1])[order]
            rotated = torch.empty_like(by_comp)
            counts = torch.bincount(flat_c, minlength=self.rot.shape[0]).tolist()
            start = 0
            for k, n in enumerate(counts):
                if n:
                    end = start + n
                    torch.mm(by_comp[start:end], self.rot[k].T, out=rotated[start:end])
                    start = end
            z = torch.empty_like(rotated).index_copy_(0, order, rotated).reshape(z.shape)
        return z.add_(self.means[comp])


def train_ensemble(
    target: GaussianMixture,
    spec: EnsembleSpec,
    seeds: Sequence[int],
    *,
    callback: Callable[[int, Ensemble], None] | None = None,
    callback_steps: Sequence[int] = (),
    prefetch: bool = True,
) -> Ensemble:
    """Train ``len(seeds)`` runs of ``spec`` on ``target`` at once (module doc).

    ``callback(step, ensemble)`` runs after the steps listed in ``callback_steps`` (``step`` =
    number of optimizer steps done; 0 = before training), e.g. for metric curves.
    ``prefetch``: draw step ``k + 1``'s random numbers (and batch-OT's assignments) in a
    background thread while step ``k`` computes; the draws do not depend on the weights, and
    each generator is used by that one thread in the same order, so the numbers are the same.
    """
    spec = copy.copy(spec).validate(target.dim)
    seeds = _check_seeds(seeds)
    dim = target.dim
    models = [make_model(dim, spec, s, check_inputs=False) for s in seeds]
    if spec.backbone == "mlp":
        module = stack_seeds(models)
    else:
        module = map_seeds(models, spec.seed_map)
    params = dict(module.named_parameters())
    _, buffers = stack_module_state(models)
    ens = Ensemble(seeds, spec, dim, module, params, buffers)
    uses_ema = spec.method == "gc" and spec.gc_model in ("ema", "const_ema")
    if uses_ema:
        ens.ema = {k: v.detach().clone() for k, v in params.items()}
        ema_rule, ema_updates = _ema_settings(spec), 0
        ema_list, param_list = list(ens.ema.values()), [p.detach() for p in params.values()]
    if spec.eval_ema is not None:
        ens.eval_ema = {k: v.detach().clone() for k, v in params.items()}
        eval_list = list(ens.eval_ema.values())
        eval_rule, eval_updates = EMARule(spec.eval_ema, 1, warmup=True), 0
        online_list = [p.detach() for p in params.values()]
    opt = _adam(list(params.values()), spec.lr)
    objective = _objective(spec, target)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = _Sampler(target, spec)
    ideal = _ideal(target, spec.ideal_steps) if spec.gc_model == "ideal" else None
    c = default_huber_c(dim)
    s_count, b = len(seeds), spec.batch
    flat = (s_count * b, dim)
    checkpoints = set(int(k) for k in callback_steps)
    if callback is not None and 0 in checkpoints:
        callback(0, ens)
    with ThreadPoolExecutor(max_workers=1) if prefetch else nullcontext() as pool:

        def request(step: int) -> Callable[[], tuple[Tensor, ...]]:
            args = (objective.schedule(step).probs, gens)
            if pool is None:
                return lambda: draw(*args)
            return pool.submit(draw, *args).result

        pending = request(0)
        for step in range(spec.steps):
            data, noise, idx, mask = pending()
            if step + 1 < spec.steps:
                pending = request(step + 1)
            sched = objective.schedule(step)
            t_lo = sched.grid[idx].float()
            t_hi = sched.grid[idx + 1].float()
            weight = sched.weights[idx].float()
            if spec.method == "gc" and bool(mask.any()):
                data = _gc_data(ens, spec, data, noise, t_lo, mask, ideal)
            x_lo, x_hi, sqcost = interpolate_pair(
                data.reshape(flat), noise.reshape(flat), t_lo.reshape(-1), t_hi.reshape(-1), "ve"
            )
            ens.pair_costs.append(sqcost.reshape(s_count, b).mean(1))
            if _uses_velocity(spec):
                with torch.no_grad():
                    v = target.velocity(x_hi, t_hi.reshape(-1), "ve")
                    x_lo = x_hi + (t_lo - t_hi).reshape(-1, 1) * v
            with torch.no_grad():
                f_lo = module(x_lo, t_lo.reshape(-1))
            f_hi = module(x_hi, t_hi.reshape(-1))
            dist = pseudo_huber(f_lo, f_hi, c).reshape(s_count, b)
            per_seed = (weight * dist).mean(1)
            _check_losses(step, per_seed.detach(), seeds)
            opt.zero_grad(set_to_none=True)
            per_seed.sum().backward()
            _set_lr(opt, spec, step)
            opt.step()
            ens.losses.append(per_seed.detach())
            if ens.eval_ema is not None:
                eval_updates += eval_rule.apply_(eval_list, online_list, step, eval_updates)
            if uses_ema:
                ema_updates += ema_rule.apply_(ema_list, param_list, step, ema_updates)
            if callback is not None and step + 1 in checkpoints:
                callback(step + 1, ens)
    return ens


def _gc_data(
    ens: Ensemble,
    spec: EnsembleSpec,
    data: Tensor,
    noise: Tensor,
    t_lo: Tensor,
    mask: Tensor,
    ideal: Callable | None,
) -> Tensor:
    """``where(mask, gc_model(data + t_lo noise, t_lo), data)`` per seed (Eq. 13-15)."""
    x_t = data + t_lo[..., None] * noise
    with torch.no_grad():
        if ideal is not None:
            xhat = data.clone()
            xhat[mask] = ideal(x_t[mask], t_lo[mask])
        else:
            xhat = ens.apply(x_t, t_lo, None if spec.gc_model == "online" else ens.ema)
    return torch.where(mask[..., None], xhat, data)


def train_sequential(
    target: GaussianMixture,
    spec: EnsembleSpec,
    seed: int,
    *,
    callback: Callable[[int, nn.Module], None] | None = None,
    callback_steps: Sequence[int] = (),
) -> tuple[nn.Module, nn.Module | None, list[float]]:
    """One seed with the library objective and an ordinary module: the reference of
    :func:`train_ensemble` (same draws, same numbers). Returns the model, its EMA (or None) and
    the losses. ``callback(step, model)`` runs after the steps in ``callback_steps`` (0 = before
    training), as in :func:`train_ensemble`. With ``spec.eval_ema`` the evaluation EMA is
    ``model.eval_ema`` (a ``gcflows.ema.EMA``; attached, not a submodule)."""
    spec = copy.copy(spec).validate(target.dim)
    model = make_model(target.dim, spec, seed)
    # foreach: the library's Adam (gcflows.training.build_optimizer), the fastest per-seed
    # baseline, with bitwise the per-tensor loop's weights
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, foreach=True)
    objective = _objective(spec, target)
    g = torch.Generator().manual_seed(int(seed))
    ema = None
    if spec.method == "gc" and spec.gc_model in ("ema", "const_ema"):
        r = _ema_settings(spec)
        ema = EMA(model, beta=r.beta, update_every=r.update_every, warmup=r.warmup)
    gc_model = None
    if spec.method == "gc":
        gc_model = {"online": model, "ideal": _ideal(target, spec.ideal_steps)}.get(
            spec.gc_model, ema
        )
    eval_ema = None
    if spec.eval_ema is not None:
        eval_ema = EMA(model, beta=spec.eval_ema, update_every=1, warmup=True)
        object.__setattr__(model, "eval_ema", eval_ema)  # not a submodule: state_dict unchanged
    losses = []
    checkpoints = set(int(k) for k in callback_steps)
    if callback is not None and 0 in checkpoints:
        callback(0, model)
    for step in range(spec.steps):
        data = target.sample(spec.batch, generator=g).float()
        out = objective(model, data, step, generator=g, gc_model=gc_model)
        _check_losses(step, out.loss.detach().reshape(1), [seed])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _set_lr(opt, spec, step)
        opt.step()
        losses.append(float(out.loss.detach()))
        if eval_ema is not None:
            eval_ema.update(model, step)
        if ema is not None:
            ema.update(model, step)
        if callback is not None and step + 1 in checkpoints:
            callback(step + 1, model)
    return model, ema, losses


def seed_steps_per_second(
    target: GaussianMixture,
    spec: EnsembleSpec,
    seeds: Sequence[int],
    vectorized: bool,
    clock: str = "wall",
) -> float:
    """Seed-steps per second of ``spec.steps`` steps for ``seeds`` (vectorized or one by one).

    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``, this
    process's CPU time: less disturbed than wall time when other processes share the cores).
    """
    if clock not in ("wall", "cpu"):
        raise bad("clock", clock, "use 'wall' or 'cpu'")
    now = time.perf_counter if clock == "wall" else time.process_time
    start = now()
    if vectorized:
        train_ensemble(target, spec, seeds)
    else:
        for s in seeds:
            train_sequential(target, spec, s)
    return len(seeds) * spec.steps / (now() - start)
