"""The proxy ``R~_t`` of a coupling, estimated by a learned regressor (docs/paper.md Eq. 17).

For a coupling of data and noise, the path ``x_t = a(t) data + b(t) noise`` has velocity
``xdot_t = a'(t) data + b'(t) noise`` and the proxy is

    R~_t = E || xdot_t - E[xdot_t | x_t] ||^2                      (docs/paper.md Eq. 17)

the part of the one-sample velocity that the position does not determine. For the independent
coupling (IC) under ``ve`` (``xdot = noise``) it is exact: ``R~_t = E tr Cov[data | x_t] / t^2``
(``gcflows.discrepancy.ic_proxy``, ``GaussianMixture.posterior_cov_trace``). Batch-OT and GC have no
closed form: :func:`estimate_proxy` fits ``E[noise | x_t]`` by mean squared error on pairs of the
coupling and returns the held-out mean squared residual at each time.

Regressor (:class:`RegressorConfig`). By default one network for all times: a residual MLP whose
layers carry a learned bias vector per time (``per_time=True``: a separate network per time), in
the parametrization that is exact for Gaussian data ``N(m, s^2 I)`` with ``F = 0``::

    E[noise | x_t] ~ t c^2 (x_t - m) + s c F(c (x_t - m), t),        c = 1 / sqrt(s^2 + t^2)

(input scale ``c``, skip ``t c^2``, output scale ``s c``). ``m`` and ``s`` (the data's mean and
per-coordinate standard deviation) are measured on the data side ``x_t - t noise`` of the training
pairs. ``F`` is trained on ``r = (noise - t c^2 (x - m)) / (s c)`` by Adam, to convergence, on the
objective ``sum_t log L_t`` (``L_t`` the mean squared error at time ``t``: every time's *relative*
excess error counts alike, as the bias is reported relative to ``R~_t``, which spans three orders
of magnitude over the times; the gradient weights time ``t`` by ``1 / L_t`` of the latest
validation score). A held-out ``val_fraction`` of the training pairs is scored
(``mean_t log L_t``) every ``eval_every`` steps; the learning rate warms up linearly over
``warmup`` steps and drops by 0.3 after ``patience // 2`` scores without an improvement of
``min_delta`` (about a relative ``min_delta`` of the geometric-mean error); training stops after
``patience`` such scores (early stopping) or at ``max_steps``, and the best-scoring weights are
kept. The estimate is the mean squared residual on ``n_test`` fresh pairs (or, with
``cross_fit``, on the other half of the training pairs, both halves in turn).

Honesty of the IC validation. The regressor sees only ``(x_t, t)`` and the statistics ``m``, ``s``
of the pairs, never the target's density or posterior: the exact IC posterior mean is not an input
and no architecture is shaped after a Gaussian mixture. The bias it shows on IC does not carry
over to the other couplings (a shared fit within 3 % on IC was +17-31 % on ideal GC at
t = 0.05), so each coupling is validated against its own reference where one exists
(:func:`gaussian_gc_proxy`, :func:`linear_proxy`; docs/highdim.md).

Bias. The held-out residual is ``R~_t + E||m_hat - m||^2``: an upper estimate, too high by the
regressor's excess error (finite network, finite pairs). Its size is measured on IC against the
exact value (docs/highdim.md); with a few thousand pairs it is dominated by the finite pairs
(overfitting the per-sample noise), not by the optimisation. The interval returned is the sampling
interval of the held-out mean (rows independent given the fitted network), not the bias.

Product estimate (``product=True``, the high-dimensional study's default). Two regressors ``F1``,
``F2`` are fitted on disjoint halves of the training pairs (independent pairs and initialisations)
and the estimate is the held-out mean of ``<noise - F1(x_t), noise - F2(x_t)>``. Given ``x_t``
the noise's deviation from its mean is independent of both fits, so the expectation is
``R~_t + E<m - F1, m - F2> = R~_t + E||m - E F||^2``: the fits' variance (overfitting the
finite pairs) cancels and only their systematic error remains, still an upper estimate in
expectation; each fit sees half the pairs, which raises that systematic part less than the
cancellation removes (docs/highdim.md, IC validation). Row by row the product is at most the mean
of the two squared residuals, so it never exceeds the two half-fits' held-out residual.

Independent times and convergence (:func:`estimate_proxy`). Each time draws its pairs, test
pairs and (per-time) fits from its own generator, seeded from the caller's before any work: with
``per_time=True`` (the high-dimensional study's setting) a time's estimate does not depend on the
pairs another time gets, bit for bit (a shared fit couples them: the early-stopping score and the
trunk are shared). ``convergence=True`` repeats the estimate on the first half of each time's
pairs (same test pairs): the margin ``|value - value_half|`` is about the excess error left at
``n`` pairs when it falls as ``1 / n``; a point whose margin exceeds ``tolerance * value`` is not
converged. Non-finite pairs and a diverging fit (non-finite validation score, or kept weights
100 times worse than predicting zero) raise ``ValueError``.

Closed forms to validate against (docs/highdim.md): :func:`gaussian_gc_proxy` (GC with the ideal
generator on one isotropic Gaussian, any ``mu``; per component of a mixture whose modes do not mix
at ``t``) and :func:`linear_proxy` (per-component least squares: exact where the pairs are jointly
Gaussian within a component, an upper bound otherwise, e.g. for batch-OT).

Ideal GC pairs in high dimension come from the exact flow map's fixed-step RK4,
``GaussianMixture.flow_map(..., method="rk4")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcflows.checks import bad, integer, is_int, real
from gcflows.processes import get_process

__all__ = [
    "ProxyEstimate",
    "RegressorConfig",
    "estimate_proxy",
    "gaussian_gc_proxy",
    "linear_proxy",
    "PairSampler",
]

# (t, n, generator) -> (x_t (n, d), noise (n, d)): n pairs of a coupling at time t (ve)
PairSampler = Callable[[float, int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class RegressorConfig:
    """How the regressor of ``E[noise | x_t]`` is fitted (module doc); validated on creation.

    ``per_time``: one network per time, or (default) one network for all times with per-time
    biases. ``hidden`` / ``depth`` / ``dropout``: the network. ``batch``, ``lr`` (Adam),
    ``warmup`` (linear warm-up steps), ``max_steps`` (cap per fit), ``eval_every`` (steps between
    validation scores), ``patience`` (scores without an improvement of ``min_delta`` in
    ``mean_t log L_t`` before stopping; the learning rate drops by 0.3 after half of them),
    ``val_fraction`` (share of the training pairs held out for the scores). ``early_stopping=False``
    trains every fit for exactly ``max_steps`` at the warmed-up learning rate and keeps the last
    weights (no drop, no stop): with ``estimate_proxy(product=True)`` the fits' overfitting
    variance cancels, so training past the early-stopping point lowers the remaining systematic
    error (docs/highdim.md, IC validation). The defaults are those measured in docs/highdim.md.
    """

    per_time: bool = False
    hidden: int = 128
    depth: int = 2
    dropout: float = 0.0
    batch: int = 512
    lr: float = 2e-3
    warmup: int = 50
    max_steps: int = 1500
    eval_every: int = 50
    patience: int = 6
    min_delta: float = 1e-3
    val_fraction: float = 0.2
    early_stopping: bool = True

    def __post_init__(self) -> None:
        where = "RegressorConfig"
        for name in ("per_time", "early_stopping"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "use True or False", where)
        for name in ("hidden", "depth", "batch", "max_steps", "eval_every", "patience"):
            integer(getattr(self, name), name, lo=1, where=where)
        integer(self.warmup, "warmup", lo=0, where=where)
        real(self.dropout, "dropout", lo=0.0, hi_open=1.0, where=where)
        real(self.lr, "lr", lo_open=0.0, where=where)
        real(self.min_delta, "min_delta", lo=0.0, hi_open=1.0, where=where)
        real(self.val_fraction, "val_fraction", lo_open=0.0, hi_open=1.0, where=where)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProxyEstimate:
    """Held-out residual at each time: ``times``, ``value``, ``half_width`` (95 %).

    Per time also: ``n_train`` (training pairs, validation share included), ``steps`` (Adam steps
    of the fit(s) behind the value; a shared ``t``-conditioned fit reports its total at every time),
    ``capped`` (a fit stopped at ``max_steps`` rather than by early stopping) and ``val_value``
    (the validation mean squared residual of the kept weights, same units as ``value``).
    With ``convergence=True`` (:func:`estimate_proxy`): ``value_half`` (the same estimate from
    the first half of the training pairs, on the same test pairs), ``margin`` (``|value -
    value_half|``), ``margin_half_width`` (95 % half-width of the mean row difference over the
    test pairs: the test rows' part of the margin's spread, not the fits') and ``converged``
    (``margin <= tolerance * value``); empty lists otherwise.
    """

    times: list[float]
    value: list[float]
    half_width: list[float]
    dim: int
    n_train: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    capped: list[bool] = field(default_factory=list)
    val_value: list[float] = field(default_factory=list)
    value_half: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    margin_half_width: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# closed forms and a linear reference for the couplings (validation of the learned proxy)
# ------------------------------------------------------------------------------------------------
def gaussian_gc_proxy(
    var: float,
    dim: int,
    t: float,
    mu: float = 1.0,
    *,
    t_min: float | None = None,
    n: int = 1 << 20,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Exact ``R~_t`` (ve) of GC with the ideal generator on one isotropic Gaussian ``N(m, var I)``
    in ``dim`` dimensions: ``(value, 95 % half-width)``.

    The ve flow map of ``N(m, s^2 I)`` from ``t`` to ``t_min`` is ``m + c (y - m)``,
    ``c^2 = (s^2 + t_min^2) / (s^2 + t^2)``. A GC pair replaces the data ``x0`` by the flow map of
    ``y = x0 + t z`` and keeps the noise ``z``, so ``x_t - m = c (x0 - m) + (1 + c) t z``: jointly
    Gaussian with ``z``, per coordinate ``Var x_t = c^2 s^2 + (1 + c)^2 t^2 =: V``,
    ``Cov(x_t, z) = (1 + c) t``, hence ``E[z | x_t] = (1 + c) t (x_t - m) / V`` and

        R~_GC = dim c^2 s^2 / (c^2 s^2 + (1 + c)^2 t^2)                   (mu = 1, exact)

    (``mu = 0``, IC: ``dim s^2 / (s^2 + t^2)``). For ``0 < mu < 1`` a pair is GC with probability
    ``mu``, IC otherwise: given ``x_t`` the noise is a two-branch mixture with weights from the
    two Gaussian likelihoods of ``r^2 = ||x_t - m||^2`` (branch ``i``: variance ``V_i``, slope
    ``b_i``, conditional variance ``v_i`` per coordinate), so
    ``tr Var[z | x_t] = sum_i w_i (dim v_i + b_i^2 r^2) - (sum_i w_i b_i)^2 r^2``, averaged over
    ``n`` draws of ``r^2`` (exact integrand; only ``r^2 = V_i chi^2_dim`` is sampled).
    A mixture of such components that do not mix at ``t`` (responsibilities near one-hot) has the
    same value per component.
    """
    var = real(var, "var", lo_open=0.0)
    dim = integer(dim, "dim", lo=1)
    t = real(t, "t", lo_open=0.0)
    mu = real(mu, "mu", lo=0.0, hi=1.0)
    t_min = get_process("ve").t_min if t_min is None else real(t_min, "t_min", lo=0.0)
    integer(n, "n", lo=2)
    c = math.sqrt((var + t_min**2) / (var + t * t))
    v_ic, b_ic, s_ic = var / (var + t * t), t / (var + t * t), var + t * t
    s_gc = c * c * var + (1 + c) ** 2 * t * t
    v_gc, b_gc = c * c * var / s_gc, (1 + c) * t / s_gc
    if mu == 1.0:
        return dim * v_gc, 0.0
    if mu == 0.0:
        return dim * v_ic, 0.0
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    branch_gc = torch.rand(n, generator=g, dtype=torch.float64) < mu
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    chi2 = torch.from_numpy(rng.chisquare(dim, n))
    r2 = chi2 * torch.where(branch_gc, s_gc, s_ic)
    logw = torch.stack(
        [
            math.log(1 - mu) - 0.5 * dim * math.log(s_ic) - 0.5 * r2 / s_ic,
            math.log(mu) - 0.5 * dim * math.log(s_gc) - 0.5 * r2 / s_gc,
        ],
        1,
    )
    w = torch.softmax(logw, 1)
    b = torch.tensor([b_ic, b_gc], dtype=torch.float64)
    v = torch.tensor([v_ic, v_gc], dtype=torch.float64)
    tr = (w * (dim * v + b * b * r2[:, None])).sum(1) - (w @ b).pow(2) * r2
    return float(tr.mean()), 1.96 * float(tr.std()) / math.sqrt(n)


@torch.no_grad()
def linear_proxy(x: Tensor, z: Tensor, labels: Tensor) -> tuple[float, float]:
    """Residual of the best affine predictor of ``z`` from ``x`` within each label: an upper bound
    on ``R~_t`` (any function of ``x_t`` is), exact where ``E[z | x_t]`` is affine per label.

    ``labels`` ``(n,)`` must be a function of ``x`` (e.g. the most likely mixture component of
    ``x_t``). Per label, ordinary least squares of ``z`` on ``[1, x]`` (``p = d + 1`` columns) in
    float64; the residual sum of squares over ``n_k - p`` degrees of freedom is unbiased for the
    affine predictor's population residual when the residual does not depend on ``x`` (and nearly
    so otherwise), so no held-out pairs are needed. Returns the label-weighted value and an
    approximate 95 % half-width (the spread of the per-row squared residuals).
    """
    x, z = x.double(), z.double()
    n, d = x.shape
    p = d + 1
    total, var = 0.0, 0.0
    for k in labels.unique():
        rows = labels == k
        n_k = int(rows.sum())
        if n_k <= p + 1:
            raise bad(
                "labels",
                f"{n_k} rows with label {int(k)}",
                f"give more than {p + 1} rows per label",
            )
        a = torch.cat([torch.ones(n_k, 1, dtype=torch.float64), x[rows]], 1)
        coef = torch.linalg.lstsq(a, z[rows]).solution
        res = (z[rows] - a @ coef).pow(2).sum(1)
        share = n_k / n
        total += share * float(res.sum()) / (n_k - p)
        var += share**2 * float(res.var()) * n_k / (n_k - p) ** 2
    return total, 1.96 * math.sqrt(var)


# ------------------------------------------------------------------------------------------------
# the regressor
# ------------------------------------------------------------------------------------------------
class _ResidualMLP(nn.Module):
    """``F(x_in, onehot) -> (B, d)``: ``h = W_in x + e_0``, ``depth`` residual layers
    ``h <- h + W_l dropout(SiLU(h + e_l))``, ``W_out SiLU(h)``.

    ``onehot`` ``(B, T)`` marks each row's time among the fit's ``T`` times; ``e_l = onehot E_l``
    are learned per-time bias vectors (zero at start), so one trunk serves all times of a
    ``t``-conditioned fit at the cost of one small product (with one time they are plain biases).
    """

    def __init__(self, dim: int, hidden: int, depth: int, dropout: float, n_times: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.time_bias = nn.Parameter(torch.zeros(n_times, depth + 1, hidden))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, onehot: Tensor) -> Tensor:
        e = (onehot @ self.time_bias.flatten(1)).view(x.shape[0], *self.time_bias.shape[1:])
        h = self.inp(x) + e[:, 0]
        for j, layer in enumerate(self.layers):
            h = h + layer(self.dropout(F.silu(h + e[:, j + 1])))
        return self.out(F.silu(h))


@dataclass
class _Fit:
    """A fitted regressor: ``predict(x (B, d), t) -> E[noise | x_t]`` and its training.

    ``mean`` / ``var``: the data statistics ``m`` and ``s^2`` of the parametrization; ``scores``:
    the validation score ``mean_t log L_t`` at every evaluation; ``kept_score``: the score of the
    weights kept (the best with early stopping, the last without); ``last_loss``: ``L_t`` (scaled
    units) at the last evaluation; ``time_weight``: the gradient weight of each time it sets for
    the next steps (``1 / L_t``, mean one).
    """

    predict: Callable[[Tensor, float], Tensor]
    steps: int
    capped: bool
    val_value: dict[float, float]
    mean: Tensor
    var: float
    scores: list[float]
    kept_score: float
    last_loss: Tensor
    time_weight: Tensor


def _diverged(t: float, value: float, zero: float, cfg: RegressorConfig) -> ValueError:
    return bad(
        "config.lr",
        cfg.lr,
        f"the regressor's fit diverged at t={t:g} (validation mean squared residual {value:.4g} "
        f"against {zero:.4g} for predicting zero); use a smaller learning rate, or check the pairs",
    )


def _split(
    xs: list[Tensor], zs: list[Tensor], times: list[float], cfg: RegressorConfig
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(train, validation)``: each ``(x, z, t, time index)`` over all times, the first
    ``val_fraction`` of each time's pairs (at least one, not all) held out."""
    tr: list[list[Tensor]] = [[], [], [], []]  # x, z, t, time index
    va: list[list[Tensor]] = [[], [], [], []]
    for j, (x, z, t) in enumerate(zip(xs, zs, times, strict=True)):
        n_val = min(max(1, round(cfg.val_fraction * x.shape[0])), x.shape[0] - 1)
        for part, rows in ((va, slice(0, n_val)), (tr, slice(n_val, None))):
            k = x[rows].shape[0]
            part[0].append(x[rows])
            part[1].append(z[rows])
            part[2].append(torch.full((k,), t))
            part[3].append(torch.full((k,), j, dtype=torch.long))
    return tuple(torch.cat(v) for v in tr), tuple(torch.cat(v) for v in va)


@dataclass
class _Scaled:
    """The parametrization of the regressor around ``net``: data mean ``m``, variance ``s2``,
    ``eye`` the one-hot rows of the fit's times."""

    net: _ResidualMLP
    m: Tensor
    s2: float
    eye: Tensor

    def parts(self, x: Tensor, t: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Skip ``t c^2 (x - m)`` ``(B, d)``, output scale ``s c`` ``(B, 1)``, ``F`` ``(B, d)``."""
        c2 = 1.0 / (self.s2 + t * t)
        xc = x - self.m
        out = self.net(c2.sqrt()[:, None] * xc, self.eye[i])
        return (t * c2)[:, None] * xc, (self.s2 * c2).sqrt()[:, None], out

    def scaled_loss(self, x: Tensor, z: Tensor, t: Tensor, i: Tensor) -> Tensor:
        """Per-row squared error in units of the output scale, per coordinate: ``(B,)``."""
        skip, scale, out = self.parts(x, t, i)
        return ((z - skip) / scale - out).pow(2).mean(1)

    def validation(self, va: tuple[Tensor, ...]) -> Tensor:
        """Mean scaled squared error per time on the validation split, ``(T,)`` float64."""
        x_va, z_va, t_va, i_va = va
        n_times = self.eye.shape[0]
        with torch.no_grad():
            rows = self.scaled_loss(x_va, z_va, t_va, i_va).double()
        sums = torch.zeros(n_times, dtype=torch.float64).index_add_(0, i_va, rows)
        return sums / torch.bincount(i_va, minlength=n_times)

    def predict(self, x: Tensor, t: float, j: int) -> Tensor:
        """``E[noise | x_t]`` ``(B, d)`` at the fit's ``j``-th time ``t``."""
        rows = x.shape[0]
        skip, scale, out = self.parts(
            x, torch.full((rows,), t), torch.full((rows,), j, dtype=torch.long)
        )
        return skip + scale * out


def _train(
    model: _Scaled,
    tr: tuple[Tensor, ...],
    va: tuple[Tensor, ...],
    times: list[float],
    cfg: RegressorConfig,
    gen,
) -> tuple[int, bool, list[float], float, Tensor, Tensor]:
    """Adam on the time-weighted scaled loss, scored every ``eval_every`` steps with early
    stopping (``_fit``); loads the kept weights. ``(steps, stopped, scores, kept score, last
    validation L_t, time weights)``."""
    net, n_times = model.net, len(times)
    x_tr, z_tr, t_tr, i_tr = tr
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    n = x_tr.shape[0]
    size = min(cfg.batch, n)
    weight = torch.ones(n_times)
    best, best_state, bad_scores, k, factor = math.inf, None, 0, 0, 1.0
    scores: list[float] = []
    stopped = False
    while k < cfg.max_steps and not stopped:
        net.train()
        for _ in range(min(cfg.eval_every, cfg.max_steps - k)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor * min(1.0, (k + 1) / max(cfg.warmup, 1))
            idx = torch.randint(0, n, (size,), generator=gen)
            i = i_tr[idx]
            loss = (weight[i] * model.scaled_loss(x_tr[idx], z_tr[idx], t_tr[idx], i)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k += 1
        net.eval()
        val = model.validation(va)
        if not bool(torch.isfinite(val).all()):
            j = int((~torch.isfinite(val)).nonzero()[0])
            raise _diverged(times[j], float(val[j]), float("nan"), cfg)
        inv = 1.0 / val.clamp_min(1e-30)
        weight = (inv / inv.mean()).float()
        score = float(val.log().mean())
        scores.append(score)
        if not cfg.early_stopping:  # a fixed-length fit: keep the latest weights
            best, best_state = score, None
        elif score < best - cfg.min_delta:
            best, bad_scores = score, 0
            best_state = {key: v.detach().clone() for key, v in net.state_dict().items()}
        else:
            bad_scores += 1
            if bad_scores == max(1, cfg.patience // 2):
                factor *= 0.3
            stopped = bad_scores >= cfg.patience
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return k, stopped, scores, best, val, weight


def _fit(xs: list[Tensor], zs: list[Tensor], times: list[float], cfg: RegressorConfig, gen) -> _Fit:
    """Fit one network on the pairs ``(xs[i], zs[i])`` at ``times[i]`` (float32, ``(n_i, d)``).

    Objective over the ``T`` times: ``sum_j log L_j`` (``L_j`` the mean squared error at time
    ``j``), so that each time's *relative* excess error counts alike (the bias is reported
    relative to ``R~_t``, which spans orders of magnitude over ``t``). Its gradient weights time
    ``j`` by ``1 / L_j``, taken from the latest validation score; early stopping scores
    ``mean_j log L_j`` on the validation split. A non-finite validation score, or kept weights
    whose validation residual exceeds 100 times that of predicting zero (an over-fitted fit can
    reach several times it; a diverged one is orders of magnitude above), is a diverged fit:
    ``ValueError`` naming the learning rate.
    """
    dim, n_times = xs[0].shape[1], len(times)
    tr, va = _split(xs, zs, times, cfg)
    x_tr, z_tr, t_tr, _ = tr
    x_va, z_va, _, i_va = va
    # data statistics: x_t - t noise is the data side of each pair
    data_side = x_tr - t_tr[:, None] * z_tr
    m = data_side.mean(0)
    s2 = float(data_side.var(0).mean().clamp_min(1e-12))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = _ResidualMLP(dim, cfg.hidden, cfg.depth, cfg.dropout, n_times)
    model = _Scaled(net, m, s2, torch.eye(n_times))
    k, stopped, scores, best, val, weight = _train(model, tr, va, times, cfg, gen)
    index = {t: j for j, t in enumerate(times)}

    def predict(x: Tensor, t: float) -> Tensor:
        """``E[noise | x_t]`` ``(B, d)`` at one of the fit's times."""
        return model.predict(x, t, index[t])

    val_value = {}
    with torch.no_grad():
        for j, t in enumerate(times):
            rows = i_va == j
            pred = predict(x_va[rows], t)
            val_value[t] = float((z_va[rows].double() - pred.double()).pow(2).sum(1).mean())
            zero = float(z_va[rows].double().pow(2).sum(1).mean())
            if not val_value[t] <= 100.0 * zero:  # NaN included
                raise _diverged(t, val_value[t], zero, cfg)
    return _Fit(predict, k, not stopped, val_value, m, s2, scores, best, val, weight)


def _draw(sampler: PairSampler, t: float, n: int, gen, dim: int | None) -> tuple[Tensor, Tensor]:
    x, z = sampler(t, n, gen)
    if not (torch.is_tensor(x) and torch.is_tensor(z)) or x.shape != z.shape or x.dim() != 2:
        raise bad("sampler", sampler, "return (x_t, noise), two tensors of one shape (n, d)")
    if x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        raise bad("sampler", sampler, f"return n = {n} rows of the same dimension at every time")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(z).all())):
        raise bad("sampler", sampler, f"return finite pairs (NaN or inf at t={t:g})")
    return x.float(), z.float()


def _child(gen: torch.Generator) -> torch.Generator:
    """A generator seeded by one draw from ``gen``."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))


def estimate_proxy(
    sampler: PairSampler,
    times: Sequence[float],
    *,
    n_train: int | Sequence[int] = 8192,
    n_test: int = 4096,
    config: RegressorConfig | None = None,
    cross_fit: bool = False,
    product: bool = False,
    convergence: bool = False,
    tolerance: float = 0.05,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> ProxyEstimate:
    """Fit ``E[noise | x_t]`` on pairs of ``sampler`` at ``times``; held-out ``R~_t`` per time.

    ``sampler(t, n, generator) -> (x_t, noise)`` draws ``n`` fresh pairs ``(n, d)`` of the coupling
    at time ``t`` (ve). ``n_train`` pairs per time (one int, or one per time: more at the hard
    times) train the regressor of ``config`` (:class:`RegressorConfig`; module doc), its
    ``val_fraction`` held out for early stopping; ``n_test`` fresh pairs per time give the estimate
    ``mean ||noise - F(x_t)||^2`` and its 95 % sampling half-width. ``cross_fit=True`` draws no
    test pairs: the training pairs of each time are split in two halves, the regressor is fitted on
    each half and scored on the other, and the estimate averages all rows (two fits, every pair
    scored once; ``n_test`` is not used). ``product=True`` fits two regressors ``F1``, ``F2`` on
    the two halves of the training pairs and returns the held-out mean of the product of their
    residuals, ``mean <noise - F1(x_t), noise - F2(x_t)>``: with independent fits its expectation
    is ``R~_t + E||m - E F||^2`` (the fits' variance cancels, the squared systematic error stays),
    still an upper estimate in expectation (module doc, Bias).

    Streams. Before any work, one generator per time is seeded from ``generator`` (plus one for a
    shared fit): a time's training pairs, test pairs and (``per_time``) fits come from its own
    stream, so with per-time fits a time's estimate does not depend on the pairs any other time
    gets (bit for bit). A shared fit (``per_time=False``) couples the times through the fit.

    ``convergence=True`` also estimates each time from the first half of its training pairs (the
    same estimator, scored on the same test pairs, fitted after the full estimate, which is
    therefore unchanged): ``value_half``, ``margin = |value - value_half|`` and ``converged =
    margin <= tolerance * value``. With an excess error falling as ``1 / n`` the margin is the
    excess left at ``n`` pairs; intervals that include it are ``value -+ (half_width + margin)``.
    Not with ``cross_fit``. Pairs and fits that are not finite, or a fit that diverges, raise
    ``ValueError``. ``progress(i)`` is called after the ``i``-th fit.
    """
    times, counts, tolerance, cfg = _check_estimate(
        times, n_train, n_test, config, cross_fit, product, convergence, tolerance
    )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    streams = [_child(gen) for _ in times]
    shared = _child(gen)
    groups = [[i] for i in range(len(times))] if cfg.per_time else [list(range(len(times)))]
    keys = ("value", "half", "steps", "capped", "val", "value_half", "margin", "diff_half")
    out: dict[str, list] = {k: [0.0] * len(times) for k in keys}
    dim = None
    fits = [0]
    mode = "cross_fit" if cross_fit else "product" if product else "held-out"

    def fitted(train: list[tuple[Tensor, Tensor]], gtimes: list[float], fit_gen) -> _Fit:
        fit = _fit([a for a, _ in train], [b for _, b in train], gtimes, cfg, fit_gen)
        fits[0] += 1
        if progress is not None:
            progress(fits[0])
        return fit

    for group in groups:
        pairs, tests = [], []
        for i in group:
            pairs.append(_draw(sampler, times[i], counts[i], streams[i], dim))
            dim = pairs[-1][0].shape[1]
            if not cross_fit:
                tests.append(_draw(sampler, times[i], n_test, streams[i], dim))
        gtimes = [times[i] for i in group]
        fit_gen = streams[group[0]] if cfg.per_time else shared
        rows, steps, capped, vals = _score(fitted, mode, pairs, tests, gtimes, fit_gen)
        rows_half = (
            _score(fitted, mode, _half(pairs, first=True), tests, gtimes, fit_gen)[0]
            if convergence
            else None
        )
        for j, i in enumerate(group):
            r = rows[j]
            out["value"][i] = float(r.mean())
            out["half"][i] = 1.96 * float(r.std()) / math.sqrt(r.numel())
            out["steps"][i] = steps
            out["capped"][i] = capped
            out["val"][i] = sum(vals[times[i]]) / len(vals[times[i]])
            if rows_half is not None:
                out["value_half"][i] = float(rows_half[j].mean())
                out["margin"][i] = abs(out["value"][i] - out["value_half"][i])
                diff = r - rows_half[j]
                out["diff_half"][i] = 1.96 * float(diff.std()) / math.sqrt(diff.numel())
            if not (math.isfinite(out["value"][i]) and math.isfinite(out["half"][i])):
                raise _diverged(times[i], out["value"][i], float("nan"), cfg)
    flags = dict(cross_fit=cross_fit, product=product, convergence=convergence)
    return _result(times, out, int(dim), counts, cfg, flags, tolerance)


def _check_estimate(
    times, n_train, n_test, config, cross_fit, product, convergence, tolerance
) -> tuple[list[float], list[int], float, RegressorConfig]:
    """``estimate_proxy``'s arguments checked: ``(times, counts per time, tolerance, config)``."""
    times = [float(t) for t in times] if isinstance(times, Sequence) else times
    if (
        not isinstance(times, list)
        or not times
        or any(not (t > 0 and math.isfinite(t)) for t in times)
    ):
        raise bad("times", times, "use a non-empty list of positive times")
    if len(set(times)) != len(times):
        raise bad("times", times, "use each time once")
    counts = [n_train] * len(times) if is_int(n_train) else list(n_train)
    if len(counts) != len(times) or not all(is_int(n) and n >= 4 for n in counts):
        raise bad("n_train", n_train, "use an integer >= 4, or one such integer per time")
    integer(n_test, "n_test", lo=1)
    for name, flag in (
        ("cross_fit", cross_fit),
        ("product", product),
        ("convergence", convergence),
    ):
        if not isinstance(flag, bool):
            raise bad(name, flag, "use True or False")
    if cross_fit and product:
        raise bad("product", product, "use product=True or cross_fit=True, not both")
    if cross_fit and convergence:
        raise bad("convergence", convergence, "use it with the held-out or product estimate")
    if convergence and not all(n >= 8 for n in counts):
        raise bad("n_train", n_train, "use >= 8 pairs per time with convergence=True")
    tolerance = real(tolerance, "tolerance", lo_open=0.0)
    cfg = RegressorConfig() if config is None else config
    if not isinstance(cfg, RegressorConfig):
        raise bad("config", cfg, "use a RegressorConfig (or None for the defaults)")
    return times, counts, tolerance, cfg


def _score(fitted, mode: str, pairs, tests, gtimes, fit_gen):
    """Rows of the estimate per time, (steps, capped), validation residual per time: ``mode``
    ``cross_fit``, ``product`` or ``held-out`` (``estimate_proxy``), ``fitted(train, times,
    generator)`` the fit."""
    resid: list[list[Tensor]] = [[] for _ in gtimes]
    steps, capped = 0, False
    vals: dict[float, list[float]] = {t: [] for t in gtimes}
    if mode == "cross_fit":
        for fold in (0, 1):  # fit on one half, score on the other
            train, test = _half(pairs, first=fold == 1), _half(pairs, first=fold == 0)
            fit = fitted(train, gtimes, fit_gen)
            steps, capped = steps + fit.steps, capped or fit.capped
            for j, ((x, z), t) in enumerate(zip(test, gtimes, strict=True)):
                resid[j].append(_residual(fit, x, z, t))
                vals[t].append(fit.val_value[t])
    elif mode == "product":
        twin = [fitted(_half(pairs, first=fold == 0), gtimes, fit_gen) for fold in (0, 1)]
        steps, capped = sum(f.steps for f in twin), any(f.capped for f in twin)
        for j, ((x, z), t) in enumerate(zip(tests, gtimes, strict=True)):
            resid[j].append(_residual_product(twin[0], twin[1], x, z, t))
            vals[t] = [f.val_value[t] for f in twin]
    else:
        fit = fitted(pairs, gtimes, fit_gen)
        steps, capped = fit.steps, fit.capped
        for j, ((x, z), t) in enumerate(zip(tests, gtimes, strict=True)):
            resid[j].append(_residual(fit, x, z, t))
            vals[t] = [fit.val_value[t]]
    return [torch.cat(r) for r in resid], steps, capped, vals


def _result(
    times: list[float],
    out: dict[str, list],
    dim: int,
    counts: list[int],
    cfg: RegressorConfig,
    flags: dict[str, bool],
    tolerance: float,
) -> ProxyEstimate:
    """The :class:`ProxyEstimate` of ``estimate_proxy``'s per-time lists ``out``."""
    conv = flags["convergence"]
    return ProxyEstimate(
        times,
        out["value"],
        out["half"],
        dim,
        n_train=counts,
        steps=out["steps"],
        capped=out["capped"],
        val_value=out["val"],
        value_half=out["value_half"] if conv else [],
        margin=out["margin"] if conv else [],
        margin_half_width=out["diff_half"] if conv else [],
        converged=[
            m <= tolerance * abs(v) for m, v in zip(out["margin"], out["value"], strict=True)
        ]
        if conv
        else [],
        config={**cfg.as_dict(), **flags, "tolerance": tolerance},
    )


def _half(pairs: list[tuple[Tensor, Tensor]], first: bool) -> list[tuple[Tensor, Tensor]]:
    """The first (or second) half of each time's ``(x_t, noise)`` pairs."""
    out = []
    for x, z in pairs:
        h = x.shape[0] // 2
        out.append((x[:h], z[:h]) if first else (x[h:], z[h:]))
    return out


@torch.no_grad()
def _residual(fit: _Fit, x: Tensor, z: Tensor, t: float) -> Tensor:
    """``||z - F(x)||^2`` per row, float64 ``(n,)``."""
    pred = fit.predict(x, t)
    return (z.double() - pred.double()).pow(2).sum(1)


@torch.no_grad()
def _residual_product(fit1: _Fit, fit2: _Fit, x: Tensor, z: Tensor, t: float) -> Tensor:
    """``<z - F1(x), z - F2(x)>`` per row, float64 ``(n,)``."""
    z = z.double()
    return ((z - fit1.predict(x, t).double()) * (z - fit2.predict(x, t).double())).sum(1)
