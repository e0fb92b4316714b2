"""Couplings of data and noise within a batch (docs/paper.md sections 2 and 4).

A coupling decides which noise row is paired with which data row before the pair is noised
(``x_t = a(t) data + b(t) noise``) and fed to a consistency loss. Every coupling returns a
:class:`CouplingResult` whose ``data`` and ``noise`` are the pairs to train on: row ``j`` of
``data`` goes with row ``j`` of ``noise``.

- :func:`independent_coupling` (IC): the pairs as drawn, ``p*(data) p(noise)`` (docs/paper.md
  section 1).
- :func:`ot_coupling` (batch-OT, Pooladian et al. 2023): the exact assignment
  ``perm = argmin_sigma sum_j ||data_j - noise_sigma(j)||^2`` over permutations of the batch
  (docs/paper.md section 2, "batch-OT baseline"; section 4, "Batch-OT cost"). A true
  permutation: every noise row is used exactly once, none is duplicated or dropped.
- :func:`sinkhorn_coupling`: entropic OT (POT, log domain), an explicit policy when it does not
  converge, noise rows drawn from the rows of the plan.
- :func:`generator_induced_coupling` (GC, docs/paper.md Eq. 13-15 and Eq. 21): with probability
  ``mu`` per sample, the data row is replaced by the gc_model's prediction
  ``xhat = gc_model(x_t, t)`` from the noised pair, with the same noise.

The mean squared costs ``cost_before`` / ``cost_after`` are the batch transport costs
``mean_j ||data_j - noise_j||^2`` of the input and output pairings (docs/paper.md section 4,
``c(0)`` for IC). Shapes: a batch is ``(B, *dims)``; costs flatten every non-batch dim.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gcflows.checks import batch_times, choice, finite, integer, pair, probability, real
from gcflows.kernels import pairwise_sqdist
from gcflows.processes import Process, get_process

__all__ = [
    "CouplingResult",
    "independent_coupling",
    "ot_coupling",
    "sinkhorn_coupling",
    "generator_induced_coupling",
    "squared_cost",
    "auto_ot_solver",
    "OT_SOLVERS",
]

OT_SOLVERS = ("auto", "lsa", "emd")
# The measured rule of solver="auto" (docs/performance.md, "Which exact solver"): POT's network
# simplex beats scipy's shortest augmenting path only on large batches of very low-dimensional
# points (many near-tied costs slow the augmenting paths); everywhere else lsa is faster.
_AUTO_EMD_MAX_DIM = 2
_AUTO_EMD_MIN_BATCH = 2048
_ON_FAILURE = ("fallback", "raise")


@dataclass
class CouplingResult:
    """The pairs a coupling produced and how it produced them.

    Attributes:
        data: ``(B, *dims)`` data rows to train on (the input data, except for the GC rows of
            :func:`generator_induced_coupling`, which hold the generator's prediction).
        noise: ``(B, *dims)`` noise rows; row ``j`` is paired with ``data[j]``.
        permutation: ``(B,)`` long with ``noise_out = noise_in[permutation]`` when the coupling
            re-paired the noise by a permutation (exact OT: every noise row used exactly once);
            ``None`` when the noise rows were not re-indexed (IC, GC) or were drawn with
            replacement (Sinkhorn).
        plan: ``(B, B)`` float64 transport plan (rows: data, columns: noise, total mass 1) when a
            non-permutation plan was used (Sinkhorn), else ``None``. The exact-OT plan is the
            permutation matrix of ``permutation`` divided by ``B``.
        status: what the solver did (method, convergence, fallback reason), in words.
        fell_back: ``True`` when the requested method failed and another one produced the pairs
            (the reason is in ``status``).
        gc_mask: ``(B,)`` bool, ``True`` for the generator-induced rows (GC only), else ``None``.
        input_pairs: the ``(data, noise)`` the coupling was given (references, no copy), from
            which ``cost_before`` is computed; ``None`` when the output pairs are the input.
        costs: ``(cost_before, cost_after)`` given by the producer (the distributed coupling
            gives the global batch's), else ``None``.

    ``cost_before`` / ``cost_after`` (floats): mean ``||data_j - noise_j||^2`` of the input and
    the output pairing. They are computed on first read, not by the coupling: training never reads
    them, so a step pays no extra pass and no host synchronisation for them. Read them before
    changing the input tensors in place.
    """

    data: Tensor
    noise: Tensor
    permutation: Tensor | None
    plan: Tensor | None
    status: str
    fell_back: bool = False
    gc_mask: Tensor | None = None
    input_pairs: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    costs: tuple[float, float] | None = None

    @cached_property
    def cost_before(self) -> float:
        if self.costs is not None:
            return float(self.costs[0])
        return _mean_cost(*(self.input_pairs or (self.data, self.noise)))

    @cached_property
    def cost_after(self) -> float:
        if self.costs is not None:
            return float(self.costs[1])
        return _mean_cost(self.data, self.noise)


# --- costs -------------------------------------------------------------------------------------
def squared_cost(data: Tensor, noise: Tensor) -> Tensor:
    """Per-row squared transport cost ``||data_j - noise_j||^2`` -> ``(B,)``.

    data, noise: ``(B, *dims)``; the norm runs over every non-batch dim. Computed from the
    difference (no ``|a|^2 + |b|^2 - 2ab`` cancellation), accumulated in float64 for float64 input
    and in float32 otherwise (the convention of ``gcflows.kernels.interpolate_pair``).
    """
    pair(data, noise)
    return _row_cost(data, noise)


def _row_cost(data: Tensor, noise: Tensor) -> Tensor:
    acc = torch.float64 if data.dtype == torch.float64 else torch.float32
    diff = data.detach().reshape(data.shape[0], -1).to(acc)
    diff = diff - noise.detach().reshape(noise.shape[0], -1).to(acc)
    return (diff * diff).sum(1)


def _mean_cost(data: Tensor, noise: Tensor) -> float:
    return float(_row_cost(data, noise).double().mean())


def _cost_matrix(data: Tensor, noise: Tensor, cost_dtype: torch.dtype | None) -> Tensor:
    """``(B, B)`` matrix ``C_ij = ||data_i - noise_j||^2`` by ``gcflows.kernels.pairwise_sqdist``.

    ``cost_dtype=None`` keeps the kernel's arithmetic dtype (float64 for float64 input, float32
    otherwise); ``torch.float64`` upcasts first. The kernel recentres points far from the origin
    and clamps at 0; its entrywise error is ``delta ~ eps (|data_i - m|^2 + |noise_j - m|^2)``
    (``eps`` of the arithmetic dtype, ``m`` a common shift), so an assignment optimal for ``C`` is
    within ``2 B delta`` of the exact optimum of the given points.
    """
    b = data.shape[0]
    d = data.detach().reshape(b, -1)
    z = noise.detach().reshape(b, -1)
    if cost_dtype is not None:
        d, z = d.to(cost_dtype), z.to(cost_dtype)
    return pairwise_sqdist(d, z)


# --- exact assignment solvers ---------------------------------------------------------------------
def _solve_lsa(cost: np.ndarray) -> np.ndarray:
    """Exact assignment by scipy's shortest augmenting path (Crouse 2016) -> ``(B,)`` int64.

    Row then column minima are subtracted first: every permutation's total shifts by the same
    constant, so the optimal assignment is unchanged, and the solver starts from tighter duals
    (about 3x faster on high-dimensional batches). Works in place on ``cost``.

    Orientation: the solver adds one row at a time and its augmenting path is long when that
    row's cheapest columns are already taken. When the rows agree on few cheapest columns while
    the columns disagree more (data from a few tight clusters against Gaussian noise: in the toy
    study's 2D batches of 256 the data rows have 2 to 4 distinct cheapest noise rows, the noise
    rows about 16 distinct cheapest data rows), the transposed problem is solved instead, the same
    optimum about 1.6x faster there (docs/performance.md); the count costs two ``argmin`` passes.
    """
    n = cost.shape[0]
    rows_distinct = np.count_nonzero(np.bincount(cost.argmin(axis=1), minlength=n))
    cols_distinct = np.count_nonzero(np.bincount(cost.argmin(axis=0), minlength=n))
    if cols_distinct > 2 * rows_distinct:
        # noise j is assigned data row back[j]; invert to data row i -> noise perm[i]
        back = _solve_reduced(np.ascontiguousarray(cost.T))
        perm = np.empty(n, dtype=np.int64)
        perm[back] = np.arange(n)
        return perm
    return _solve_reduced(cost)


def _solve_reduced(cost: np.ndarray) -> np.ndarray:
    """Row and column reduction, then ``linear_sum_assignment``: ``perm[row] = column``."""
    cost -= cost.min(axis=1, keepdims=True)
    cost -= cost.min(axis=0, keepdims=True)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def auto_ot_solver(batch: int, dim: int) -> str:
    """The exact solver ``ot_coupling(solver="auto")`` uses for ``batch`` rows of ``dim`` features.

    ``"emd"`` when ``dim <= 2`` and ``batch >= 2048``, else ``"lsa"``: the rule measured with
    ``experiments/bench_couplings.py`` over B = 128..4096, D = 2..3072 (docs/performance.md).
    """
    return "emd" if dim <= _AUTO_EMD_MAX_DIM and batch >= _AUTO_EMD_MIN_BATCH else "lsa"


def _emd_max_iter(batch: int) -> int:
    """Network-simplex iteration limit raised with the batch (POT's default 100000 is too small
    at batch 2048 and returns a suboptimal plan with only a warning: docs/design.md, peers and
    pitfalls)."""
    return max(100_000, 50 * batch * batch)


def _solve_emd(cost: np.ndarray, max_iter: int) -> tuple[np.ndarray | None, str]:
    """Exact OT by POT's network simplex; returns ``(perm, "")`` or ``(None, reason)``.

    With uniform weights ``1/B`` the simplex ends on a vertex of the Birkhoff polytope, i.e.
    ``B * plan`` is a permutation matrix; anything else (iteration limit, infeasible, a plan that
    is not a permutation) is reported as a failure, never accepted.
    """
    import ot  # here, not at the top: POT imports scikit-learn and networkx (~1.5 s)

    n = cost.shape[0]
    w = np.full(n, 1.0 / n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns on failure; the result code is checked below
        plan, log = ot.emd(w, w, cost, numItermax=max_iter, log=True)
    if log["result_code"] != 1:
        return None, f"ot.emd result_code {log['result_code']}: {log['warning']}"
    scaled = plan * n
    perm = scaled.argmax(axis=1)
    # a permutation matrix has one entry 1 per row, all others 0; 1e-9 absorbs the 1/n rounding
    is_perm = (
        np.array_equal(np.sort(perm), np.arange(n))
        and np.abs(scaled[np.arange(n), perm] - 1.0).max() <= 1e-9
        and abs(scaled.sum() - n) <= 1e-9 * n
    )
    if not is_perm:
        return None, "ot.emd returned a plan that is not a permutation matrix"
    return perm.astype(np.int64), ""


# --- couplings ----------------------------------------------------------------------------------
def independent_coupling(data: Tensor, noise: Tensor) -> CouplingResult:
    """Independent coupling (IC): the pairs as drawn, ``(data_j, noise_j)``.

    data, noise: ``(B, *dims)``. Returns the same tensors, ``permutation=None`` (no re-indexing)
    and ``cost_before == cost_after = mean_j ||data_j - noise_j||^2`` (docs/paper.md section 4,
    c(0)).
    """
    pair(data, noise)
    return CouplingResult(
        data=data, noise=noise, permutation=None, plan=None, status="independent: pairs as drawn"
    )


def ot_coupling(
    data: Tensor,
    noise: Tensor,
    *,
    solver: str = "auto",
    cost_dtype: torch.dtype | None = None,
    emd_max_iter: int | None = None,
    validate: bool = True,
) -> CouplingResult:
    """Exact batch-OT coupling: the optimal permutation of the noise for the squared cost.

    Solves ``perm = argmin_sigma sum_j ||data_j - noise_sigma(j)||^2`` over all permutations of
    ``B`` rows (docs/paper.md section 2, batch-OT baseline) on the cost matrix of
    ``gcflows.kernels.pairwise_sqdist`` (flattened non-batch dims). Returns ``data`` unchanged and
    ``noise[perm]``, so row ``j`` of data pairs with ``noise[perm[j]]``; no sampling, no
    replacement, so no noise row is duplicated or dropped.

    Args:
        data, noise: ``(B, *dims)`` finite float tensors, same shape, dtype and device, B >= 1.
        solver: ``"auto"`` (default: the faster of the two exact solvers for this batch size and
            dimension, by the measured rule of :func:`auto_ot_solver`; ``status`` names the
            choice), ``"lsa"`` (scipy ``linear_sum_assignment`` after row / column reduction,
            fastest except on large low-dimensional batches) or ``"emd"`` (POT's network simplex
            ``ot.emd`` with the iteration limit raised to ``max(100000, 50 B^2)``; fastest for
            ``D <= 2`` from ``B ~ 2048``). If ``"emd"`` stops early or returns a plan that is not
            a permutation, the exact ``"lsa"`` solver produces the pairs instead, with
            ``fell_back=True``, the reason in ``status`` and a ``RuntimeWarning``: a suboptimal
            plan is never returned. All three give the same optimal cost (ties aside, the same
            permutation).
        cost_dtype: arithmetic of the cost matrix. ``None`` (default): float64 for float64
            input, float32 otherwise; the assignment is exactly optimal for that matrix and within
            ``2 B delta`` of the exact optimum, ``delta ~ eps |x|^2`` its entrywise rounding
            (float32: ~1e-7 of the mean cost, float64: ~1e-16). ``torch.float64`` solves float32
            points in float64 (about 2x slower on CPU for large dimensions).
        emd_max_iter: overrides the ``"emd"`` iteration limit (for tests of the fallback path).
        validate: ``False`` skips the argument checks, for a caller that checked the batch at its
            own entry point (the training objective; docs/design.md section 3, checks once).

    Returns:
        CouplingResult with ``permutation`` ``(B,)`` long (on data's device), ``plan=None``,
        ``cost_after <= cost_before`` (the identity is one of the permutations).
    """
    if validate:
        pair(data, noise)
        choice(solver, "solver", OT_SOLVERS)
        choice(cost_dtype, "cost_dtype", (None, torch.float32, torch.float64))
        if emd_max_iter is not None:
            integer(emd_max_iter, "emd_max_iter", lo=1, fix="use a positive integer or None")
    b = data.shape[0]
    chosen = auto_ot_solver(b, data[0].numel()) if solver == "auto" else solver
    cost_t = _cost_matrix(data, noise, cost_dtype)
    where = f"the {str(cost_t.dtype).replace('torch.', '')} squared-distance matrix"
    if solver == "auto":
        where += f" (solver='auto' chose {chosen!r} for B={b}, D={data[0].numel()})"
    # scipy and POT work in float64: one C-contiguous float64 copy on the host
    cost = np.ascontiguousarray(cost_t.cpu().numpy(), dtype=np.float64)
    fell_back = False
    if chosen == "lsa":
        perm = _solve_lsa(cost)
        status = f"optimal: scipy linear_sum_assignment on {where}"
    else:
        max_iter = _emd_max_iter(b) if emd_max_iter is None else int(emd_max_iter)
        perm, reason = _solve_emd(cost.copy(), max_iter)
        if perm is None:
            perm = _solve_lsa(cost)
            fell_back = True
            status = (
                f"emd failed ({reason}; numItermax={max_iter}); fell back to the exact "
                "scipy linear_sum_assignment"
            )
            warnings.warn(f"ot_coupling: {status}", RuntimeWarning, stacklevel=2)
        else:
            status = f"optimal: ot.emd network simplex (numItermax={max_iter}) on {where}"
    perm_t = torch.from_numpy(perm).to(data.device)
    noise_out = noise[perm_t]
    return CouplingResult(
        data=data,
        noise=noise_out,
        permutation=perm_t,
        plan=None,
        input_pairs=(data, noise),
        status=status,
        fell_back=fell_back,
    )


def sinkhorn_coupling(
    data: Tensor,
    noise: Tensor,
    *,
    reg: float = 0.05,
    max_iter: int = 1000,
    tol: float = 1e-6,
    on_failure: str = "fallback",
    generator: torch.Generator | None = None,
) -> CouplingResult:
    """Entropic OT coupling (POT ``ot.sinkhorn(method="sinkhorn_log")``), noise drawn per row.

    Solves ``min_P <P, C / mean(C)> + reg * sum P log P`` over plans with uniform marginals
    ``1/B``, ``C`` the float64 squared-distance matrix of ``pairwise_sqdist``. The cost is divided
    by its mean (the mean squared distance over all pairs of the batch), so ``reg`` is relative to
    the typical squared distance and means the same in 2 or 3072 dimensions of any scale.

    Convergence: the marginal error ``max(|P 1 - 1/B|_1, |P^T 1 - 1/B|_1)`` (probability mass
    misplaced, in [0, 2]) must be at most ``tol``; POT is stopped at L2 error ``tol / sqrt(B)``,
    which implies it. If it is not reached within ``max_iter`` iterations (or the plan is not
    finite): ``on_failure="fallback"`` returns :func:`ot_coupling` (exact, ``solver="auto"``) with
    ``fell_back=True``, the reason in ``status`` and a ``RuntimeWarning``; ``on_failure="raise"``
    raises ``RuntimeError``.

    Pairs: each data row ``j`` keeps its place and draws one noise index from the plan row
    ``P[j] / P[j].sum()`` with ``generator``. This samples the plan's conditional law exactly and
    keeps every data row once; the noise is drawn with replacement (a noise row may repeat), its
    marginal is uniform in expectation. Rounding to a permutation is not offered: the most likely
    permutation of a Sinkhorn plan is the exact OT permutation (``sum log P`` over a permutation
    is a constant minus ``sum C / reg``), which :func:`ot_coupling` computes directly.

    Args:
        data, noise: ``(B, *dims)`` finite float tensors, same shape, dtype and device.
        reg: entropic regularisation relative to the mean cost, > 0.
        max_iter: Sinkhorn iterations, >= 1. tol: marginal error bound, > 0.
        on_failure: ``"fallback"`` or ``"raise"``.
        generator: ``torch.Generator`` on data's device for the row draws (None: global RNG).

    Returns:
        CouplingResult with ``plan`` ``(B, B)`` float64 (total mass 1), ``permutation=None``,
        ``data`` unchanged, ``noise`` the drawn rows.
    """
    import ot  # here, not at the top: POT imports scikit-learn and networkx (~1.5 s)

    pair(data, noise)
    fix = "use a positive finite float ({})"
    reg = real(reg, "reg", lo_open=0.0, fix=fix.format("the entropic weight / the mean cost"))
    tol = real(tol, "tol", lo_open=0.0, fix=fix.format("the allowed marginal error"))
    max_iter = integer(max_iter, "max_iter", lo=1)
    choice(on_failure, "on_failure", _ON_FAILURE)
    b = data.shape[0]
    cost = _cost_matrix(data, noise, torch.float64)
    scale = float(cost.mean())
    normalised = cost / scale if scale > 0 else cost  # all points equal: any plan is optimal
    w = torch.full((b,), 1.0 / b, dtype=torch.float64, device=cost.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT's convergence warning is replaced by the check below
        plan, log = ot.sinkhorn(
            w,
            w,
            normalised,
            float(reg),
            method="sinkhorn_log",
            numItermax=int(max_iter),
            stopThr=float(tol) / math.sqrt(b),
            log=True,
            warn=False,
        )
    n_iter = int(log["niter"]) + 1
    err = _marginal_error(plan, w)
    if not err <= tol:
        reason = (
            f"sinkhorn did not converge: marginal error {err:.3e} > tol {tol:.3e} after "
            f"{n_iter} iterations (reg={reg}, max_iter={max_iter})"
        )
        if on_failure == "raise":
            raise RuntimeError(f"{reason}; increase max_iter or reg, or use ot_coupling")
        res = ot_coupling(data, noise)
        res.fell_back = True
        res.status = f"{reason}; fell back to exact OT ({res.status})"
        warnings.warn(f"sinkhorn_coupling: {res.status}", RuntimeWarning, stacklevel=2)
        return res
    gen_device = generator.device if generator is not None else plan.device
    rows = plan.to(gen_device)
    idx = torch.multinomial(rows, 1, replacement=True, generator=generator).squeeze(1)
    noise_out = noise[idx.to(noise.device)]
    return CouplingResult(
        data=data,
        noise=noise_out,
        permutation=None,
        plan=plan,
        input_pairs=(data, noise),
        status=(
            f"converged: sinkhorn_log, {n_iter} iterations, marginal error {err:.2e} <= {tol:.1e},"
            f" reg={reg} x mean cost {scale:.4g}; noise drawn from plan rows (with replacement)"
        ),
    )


def _marginal_error(plan: Tensor, w: Tensor) -> float:
    """``max(|P 1 - w|_1, |P^T 1 - w|_1)``, the mass a plan misplaces (inf if not finite)."""
    if not bool(torch.isfinite(plan).all()):
        return math.inf
    return max(float((plan.sum(1) - w).abs().sum()), float((plan.sum(0) - w).abs().sum()))


def generator_induced_coupling(
    data: Tensor,
    noise: Tensor,
    gc_model,
    t: Tensor | float,
    process: Process | str,
    *,
    mu: float,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> CouplingResult:
    """Generator-induced coupling (GC, docs/paper.md Eq. 13-15) mixed with IC at rate mu (Eq. 21).

    ``x_t = process.interpolate(data, noise, t)``; ``xhat = gc_model(x_t, t)`` under
    ``torch.no_grad()`` (a stop-gradient: the output never requires grad); each sample is GC with
    probability ``mu``: ``mask_j ~ Bernoulli(mu)`` independently from ``generator``; the output
    data is ``where(mask, xhat, data)`` and the noise is the same noise (the GC path
    ``xhat + s noise`` of Eq. 14-15 reuses it). Rows with ``mask_j = False`` are IC rows, bitwise
    unchanged. The gc_model is called on the GC rows only (a ``(n_gc, *dims)`` batch), and not at
    all when no row is GC; put a network in ``eval()`` mode first.

    Args:
        data, noise: ``(B, *dims)`` finite float tensors, same shape, dtype and device.
        gc_model: callable ``(x_t (B, *dims), t (B,)) -> (B, *dims)`` data prediction (the EMA
            model, a frozen model, or the ideal flow map).
        t: float or ``(B,)`` times in ``[process.t_min, process.t_max]``.
        process: a :class:`~gcflows.processes.Process` or its name (``"ve"``, ``"linear"``).
        mu: probability that a sample is generator-induced, in ``[0, 1]``.
        generator: ``torch.Generator`` for the mask (None: global RNG).
        validate: ``False`` skips the checks of the arguments and of the gc_model's output, for
            a caller that checked at its own entry point (the training objective, whose loss is
            checked for NaN / inf anyway; docs/design.md section 3, checks once).

    Returns:
        CouplingResult with ``gc_mask`` ``(B,)`` bool, ``permutation=None``, ``plan=None``,
        ``noise`` the input noise, ``cost_after`` the mean squared cost of the output pairs.
    """
    process = get_process(process)
    b = data.shape[0]
    if validate:
        pair(data, noise)
        mu_f = probability(mu, "mu", "that a sample is generator-induced")
        if not callable(gc_model):
            raise ValueError(f"gc_model must be callable as gc_model(x_t, t), got {type(gc_model)}")
        t_vec = batch_times(t, b, data, "t")
        process.check_time(t_vec, "t")
    else:
        mu_f = float(mu)
        t_vec = t if torch.is_tensor(t) and t.shape == (b,) else batch_times(t, b, data, "t")
    mask_device = generator.device if generator is not None else data.device
    mask = (torch.rand(b, generator=generator, device=mask_device) < mu_f).to(data.device)
    n_gc = int(mask.sum())
    data_out = data
    if n_gc > 0:
        # Only the GC rows are sent through the gc_model: at mu = 0.5 this halves the extra
        # forward pass that GC costs (docs/paper.md section 2 reports about +20 % wall-clock).
        rows = mask.nonzero().squeeze(1) if n_gc < b else slice(None)
        with torch.no_grad():
            x_t = process.interpolate(data[rows], noise[rows], t_vec[rows])
            xhat = gc_model(x_t, t_vec[rows])
        if validate:
            if not torch.is_tensor(xhat) or xhat.shape != x_t.shape:
                shape = tuple(xhat.shape) if torch.is_tensor(xhat) else type(xhat).__name__
                raise ValueError(
                    f"gc_model must return a tensor of the data's shape {tuple(x_t.shape)}, "
                    f"got {shape}"
                )
            finite(xhat, "gc_model output")
        data_out = data.clone()
        data_out[rows] = xhat.to(data)
    return CouplingResult(
        data=data_out,
        noise=noise,
        permutation=None,
        plan=None,
        input_pairs=(data, noise),
        status=f"generator-induced: {n_gc} of {b} rows (mu={mu_f}), same noise",
        gc_mask=mask,
    )
