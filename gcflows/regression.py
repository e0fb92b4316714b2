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
and no architecture is shaped after a Gaussian mixture. The bias it shows on IC (where the exact
value is known) is therefore a measure of the bias it carries on the couplings without a closed
form, which are fitted with the same settings and pair counts.

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

Ideal GC pairs in high dimension come from the exact flow map's fixed-step RK4,
``GaussianMixture.flow_map(..., method="rk4")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcflows.checks import bad, integer, is_int, real

__all__ = [
    "ProxyEstimate",
    "RegressorConfig",
    "estimate_proxy",
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
    """

    times: list[float]
    value: list[float]
    half_width: list[float]
    dim: int
    n_train: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    capped: list[bool] = field(default_factory=list)
    val_value: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


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
    """A fitted regressor: ``predict(x (B, d), t) -> E[noise | x_t]`` and its training."""

    predict: Callable[[Tensor, float], Tensor]
    steps: int
    capped: bool
    val_value: dict[float, float]


def _fit(xs: list[Tensor], zs: list[Tensor], times: list[float], cfg: RegressorConfig, gen) -> _Fit:
    """Fit one network on the pairs ``(xs[i], zs[i])`` at ``times[i]`` (float32, ``(n_i, d)``).

    Objective over the ``T`` times: ``sum_j log L_j`` (``L_j`` the mean squared error at time
    ``j``), so that each time's *relative* excess error counts alike (the bias is reported
    relative to ``R~_t``, which spans orders of magnitude over ``t``). Its gradient weights time
    ``j`` by ``1 / L_j``, taken from the latest validation score; early stopping scores
    ``mean_j log L_j`` on the validation split.
    """
    dim, n_times = xs[0].shape[1], len(times)
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
    x_tr, z_tr, t_tr, i_tr = (torch.cat(v) for v in tr)
    x_va, z_va, t_va, i_va = (torch.cat(v) for v in va)
    eye = torch.eye(n_times)
    # data statistics: x_t - t noise is the data side of each pair
    data_side = x_tr - t_tr[:, None] * z_tr
    m = data_side.mean(0)
    s2 = float(data_side.var(0).mean().clamp_min(1e-12))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = _ResidualMLP(dim, cfg.hidden, cfg.depth, cfg.dropout, n_times)

    def parts(x: Tensor, t: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Skip ``t c^2 (x - m)`` ``(B, d)``, output scale ``s c`` ``(B, 1)``, ``F`` ``(B, d)``."""
        c2 = 1.0 / (s2 + t * t)
        xc = x - m
        out = net(c2.sqrt()[:, None] * xc, eye[i])
        return (t * c2)[:, None] * xc, (s2 * c2).sqrt()[:, None], out

    def scaled_loss(x: Tensor, z: Tensor, t: Tensor, i: Tensor) -> Tensor:
        """Per-row squared error in units of the output scale, per coordinate: ``(B,)``."""
        skip, scale, out = parts(x, t, i)
        return ((z - skip) / scale - out).pow(2).mean(1)

    def validation() -> Tensor:
        """Mean scaled squared error per time on the validation split, ``(T,)`` float64."""
        with torch.no_grad():
            rows = scaled_loss(x_va, z_va, t_va, i_va).double()
        sums = torch.zeros(n_times, dtype=torch.float64).index_add_(0, i_va, rows)
        return sums / torch.bincount(i_va, minlength=n_times)

    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    n = x_tr.shape[0]
    size = min(cfg.batch, n)
    weight = torch.ones(n_times)
    best, best_state, bad_scores, k, factor = math.inf, None, 0, 0, 1.0
    stopped = False
    while k < cfg.max_steps and not stopped:
        net.train()
        for _ in range(min(cfg.eval_every, cfg.max_steps - k)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor * min(1.0, (k + 1) / max(cfg.warmup, 1))
            idx = torch.randint(0, n, (size,), generator=gen)
            i = i_tr[idx]
            loss = (weight[i] * scaled_loss(x_tr[idx], z_tr[idx], t_tr[idx], i)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k += 1
        net.eval()
        val = validation()
        inv = 1.0 / val.clamp_min(1e-30)
        weight = (inv / inv.mean()).float()
        score = float(val.log().mean())
        if not cfg.early_stopping:  # a fixed-length fit: keep the latest weights
            best_state = None
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
    index = {t: j for j, t in enumerate(times)}

    def predict(x: Tensor, t: float) -> Tensor:
        """``E[noise | x_t]`` ``(B, d)`` at one of the fit's times."""
        rows = x.shape[0]
        skip, scale, out = parts(
            x, torch.full((rows,), t), torch.full((rows,), index[t], dtype=torch.long)
        )
        return skip + scale * out

    val_value = {}
    with torch.no_grad():
        for j, t in enumerate(times):
            rows = i_va == j
            pred = predict(x_va[rows], t)
            val_value[t] = float((z_va[rows].double() - pred.double()).pow(2).sum(1).mean())
    return _Fit(predict, k, not stopped, val_value)


def _draw(sampler: PairSampler, t: float, n: int, gen, dim: int | None) -> tuple[Tensor, Tensor]:
    x, z = sampler(t, n, gen)
    if not (torch.is_tensor(x) and torch.is_tensor(z)) or x.shape != z.shape or x.dim() != 2:
        raise bad("sampler", sampler, "return (x_t, noise), two tensors of one shape (n, d)")
    if x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        raise bad("sampler", sampler, f"return n = {n} rows of the same dimension at every time")
    return x.float(), z.float()


def estimate_proxy(
    sampler: PairSampler,
    times: Sequence[float],
    *,
    n_train: int | Sequence[int] = 8192,
    n_test: int = 4096,
    config: RegressorConfig | None = None,
    cross_fit: bool = False,
    product: bool = False,
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
    still an upper estimate in expectation (module doc, Bias). ``progress(i)`` is called after the
    ``i``-th fit.
    """
    times = [float(t) for t in times] if isinstance(times, Sequence) else times
    if (
        not isinstance(times, list)
        or not times
        or any(not (t > 0 and math.isfinite(t)) for t in times)
    ):
        raise bad("times", times, "use a non-empty list of positive times")
    counts = [n_train] * len(times) if is_int(n_train) else list(n_train)
    if len(counts) != len(times) or not all(is_int(n) and n >= 4 for n in counts):
        raise bad("n_train", n_train, "use an integer >= 4, or one such integer per time")
    integer(n_test, "n_test", lo=1)
    if not isinstance(cross_fit, bool):
        raise bad("cross_fit", cross_fit, "use True or False")
    if not isinstance(product, bool):
        raise bad("product", product, "use True or False")
    if cross_fit and product:
        raise bad("product", product, "use product=True or cross_fit=True, not both")
    cfg = RegressorConfig() if config is None else config
    if not isinstance(cfg, RegressorConfig):
        raise bad("config", cfg, "use a RegressorConfig (or None for the defaults)")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    groups = [[i] for i in range(len(times))] if cfg.per_time else [list(range(len(times)))]
    out = {k: [0.0] * len(times) for k in ("value", "half", "steps", "capped", "val")}
    dim = None
    fits = 0
    for group in groups:
        pairs = []
        for i in group:
            x, z = _draw(sampler, times[i], counts[i], gen, dim)
            dim = x.shape[1]
            pairs.append((x, z))
        gtimes = [times[i] for i in group]
        resid: list[list[Tensor]] = [[] for _ in group]
        steps, capped = 0, False
        vals: dict[float, list[float]] = {}
        if cross_fit:
            for fold in (0, 1):  # fit on one half, score on the other
                train, test = _half(pairs, first=fold == 1), _half(pairs, first=fold == 0)
                fit = _fit([a for a, _ in train], [b for _, b in train], gtimes, cfg, gen)
                fits += 1
                if progress is not None:
                    progress(fits)
                steps, capped = steps + fit.steps, capped or fit.capped
                for j, ((x, z), t) in enumerate(zip(test, gtimes, strict=True)):
                    resid[j].append(_residual(fit, x, z, t))
                    vals.setdefault(t, []).append(fit.val_value[t])
        elif product:
            twin = []
            for fold in (0, 1):  # one fit per half, both scored on fresh pairs
                train = _half(pairs, first=fold == 0)
                twin.append(_fit([a for a, _ in train], [b for _, b in train], gtimes, cfg, gen))
                fits += 1
                if progress is not None:
                    progress(fits)
                steps, capped = steps + twin[-1].steps, capped or twin[-1].capped
            for j, t in enumerate(gtimes):
                x, z = _draw(sampler, t, n_test, gen, dim)
                resid[j].append(_residual_product(twin[0], twin[1], x, z, t))
                vals[t] = [0.5 * (twin[0].val_value[t] + twin[1].val_value[t])]
        else:
            fit = _fit([p[0] for p in pairs], [p[1] for p in pairs], gtimes, cfg, gen)
            fits += 1
            if progress is not None:
                progress(fits)
            steps, capped = fit.steps, fit.capped
            for j, t in enumerate(gtimes):
                x, z = _draw(sampler, t, n_test, gen, dim)
                resid[j].append(_residual(fit, x, z, t))
                vals[t] = [fit.val_value[t]]
        for j, i in enumerate(group):
            r = torch.cat(resid[j])
            out["value"][i] = float(r.mean())
            out["half"][i] = 1.96 * float(r.std()) / math.sqrt(r.numel())
            out["steps"][i] = steps
            out["capped"][i] = capped
            out["val"][i] = sum(vals[times[i]]) / len(vals[times[i]])
    return ProxyEstimate(
        times,
        out["value"],
        out["half"],
        int(dim),
        n_train=counts,
        steps=out["steps"],
        capped=out["capped"],
        val_value=out["val"],
        config={**cfg.as_dict(), "cross_fit": cross_fit, "product": product},
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
