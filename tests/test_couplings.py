"""Tests of gcflows.couplings: the mathematics of each coupling (docs/paper.md sections 2 and 4).

Exact OT is checked against brute force over all permutations (B <= 6) and against POT's
``ot.emd2`` on the same batch; GC against its definition (Eq. 13-15, 21); Sinkhorn against its
marginal constraints and the entropic suboptimality bound.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import gcflows.couplings as couplings_module
from gcflows.couplings import (
    CouplingResult,
    generator_induced_coupling,
    independent_coupling,
    ot_coupling,
    sinkhorn_coupling,
    squared_cost,
)
from gcflows.processes import LinearProcess, VEProcess

F64 = torch.float64


def _pair(b, dims, seed, dtype=F64, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((b, *dims), generator=g, dtype=dtype) + shift
    noise = torch.randn((b, *dims), generator=g, dtype=dtype)
    return data, noise


def _emd2(data, noise):
    """Exact OT cost (uniform weights) by POT on the float64 squared-distance matrix."""
    b = data.shape[0]
    d = data.reshape(b, -1).double().numpy()
    z = noise.reshape(b, -1).double().numpy()
    w = np.full(b, 1.0 / b)
    return float(ot.emd2(w, w, ot.dist(d, z), numItermax=max(100_000, 50 * b * b)))


def _assert_permutation(res: CouplingResult, noise):
    b = noise.shape[0]
    assert res.permutation is not None and res.permutation.dtype == torch.long
    assert torch.equal(torch.sort(res.permutation).values, torch.arange(b))
    assert torch.equal(res.noise, noise[res.permutation])  # a gather: bitwise


# --- exact OT -----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["lsa", "emd"])
@pytest.mark.parametrize("dims", [(2,), (3, 4, 5)])
def test_ot_permutation_optimal_equals_emd2(solver, dims):
    data, noise = _pair(48, dims, seed=0)
    res = ot_coupling(data, noise, solver=solver)
    _assert_permutation(res, noise)
    assert res.data is data and not res.fell_back and res.plan is None
    assert res.cost_after <= res.cost_before
    # cost_after is a mean of direct differences; ot.emd2 uses the |a|^2+|b|^2-2ab matrix: in
    # float64 the two agree to ~1e-14 relative, so 1e-9 leaves a wide margin but catches any
    # suboptimal permutation (whose cost gap is O(1 / B) of the mean here).
    assert res.cost_after == pytest.approx(_emd2(data, noise), rel=1e-9)
    assert res.cost_before == pytest.approx(float(squared_cost(data, noise).mean()), rel=1e-12)


@given(b=st.integers(1, 6), d=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
@example(b=1, d=1, seed=0)
@example(b=6, d=1, seed=1)
def test_ot_matches_brute_force(b, d, seed):
    data, noise = _pair(b, (d,), seed)
    res = ot_coupling(data, noise)
    _assert_permutation(res, noise)
    pair_cost = ((data[:, None, :] - noise[None, :, :]) ** 2).sum(-1)  # (B, B) direct
    best = min(
        float(pair_cost[torch.arange(b), torch.tensor(p)].sum())
        for p in itertools.permutations(range(b))
    )
    # same float64 per-pair costs summed in a different order: agreement to ~1e-15 relative
    assert res.cost_after * b == pytest.approx(best, rel=1e-12, abs=1e-12)


@given(
    b=st.integers(1, 40),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    shift=st.sampled_from([0.0, 3.0]),
)
@example(b=1, d=1, seed=0, shift=0.0)
@example(b=40, d=8, seed=7, shift=3.0)
def test_ot_property_lsa_emd_emd2_agree(b, d, seed, shift):
    data, noise = _pair(b, (d,), seed, shift=shift)
    lsa = ot_coupling(data, noise, solver="lsa")
    emd = ot_coupling(data, noise, solver="emd")
    for res in (lsa, emd):
        _assert_permutation(res, noise)
        assert not res.fell_back
        assert res.cost_after <= res.cost_before * (1 + 1e-12)  # identity is a permutation
    ref = _emd2(data, noise)
    # rel 1e-9: float64 matrix vs direct differences differ by ~1e-14 relative (see above)
    assert lsa.cost_after == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert emd.cost_after == pytest.approx(lsa.cost_after, rel=1e-9, abs=1e-12)


def test_ot_large_batch_no_iteration_cap():
    # B = 600 in 2D: a batch where a capped or approximate solver would show; ot_coupling raises
    # the "emd" limit to 50 B^2 and "lsa" has none: both must reach the optimum of ot.emd2 (run
    # with the raised limit too). Tolerance as in test_ot_permutation_optimal_equals_emd2.
    data, noise = _pair(600, (2,), seed=3)
    lsa = ot_coupling(data, noise, solver="lsa")
    emd = ot_coupling(data, noise, solver="emd")
    _assert_permutation(lsa, noise)
    _assert_permutation(emd, noise)
    assert not emd.fell_back and "numItermax=18000000" in emd.status
    ref = _emd2(data, noise)
    assert lsa.cost_after == pytest.approx(ref, rel=1e-9)
    assert emd.cost_after == pytest.approx(ref, rel=1e-9)


def test_auto_solver_rule_and_result(monkeypatch):
    # The measured rule (docs/performance.md): emd only for D <= 2 and B >= 2048.
    assert couplings_module.auto_ot_solver(2047, 2) == "lsa"
    assert couplings_module.auto_ot_solver(2048, 2) == "emd"
    assert couplings_module.auto_ot_solver(4096, 1) == "emd"
    assert couplings_module.auto_ot_solver(4096, 3) == "lsa"
    assert couplings_module.auto_ot_solver(128, 3072) == "lsa"
    data, noise = _pair(80, (2,), seed=5)
    ref = ot_coupling(data, noise, solver="lsa")
    for min_batch, chosen in ((10**9, "lsa"), (64, "emd")):  # both branches on a small batch
        monkeypatch.setattr(couplings_module, "_AUTO_EMD_MIN_BATCH", min_batch)
        res = ot_coupling(data, noise)  # solver="auto" is the default
        _assert_permutation(res, noise)
        assert f"solver='auto' chose '{chosen}' for B=80, D=2" in res.status
        assert not res.fell_back
        assert res.cost_after == pytest.approx(ref.cost_after, rel=1e-12)
    images, image_noise = _pair(6, (1, 2, 2), seed=6)  # D counts every non-batch element
    assert "D=4" in ot_coupling(images, image_noise).status


def _clustered_pair(b, seed, dtype=F64):
    """Data from two tight clusters (the toy study's target: modes (0, +-0.5), std 0.01) and
    Gaussian noise: the data rows share few cheapest noise rows, the noise rows many more."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (b,), generator=g).to(dtype) * 2 - 1
    data = 0.01 * torch.randn(b, 2, generator=g, dtype=dtype)
    data[:, 1] += 0.5 * sign
    return data, torch.randn(b, 2, generator=g, dtype=dtype)


@pytest.mark.parametrize("b", [2, 5, 64, 256])
@pytest.mark.parametrize("swap", [False, True], ids=["clustered-data", "clustered-noise"])
def test_lsa_orientation_on_clustered_rows_keeps_the_optimum(monkeypatch, b, swap):
    # _solve_lsa solves the transposed problem when the columns have more than twice as many
    # distinct cheapest rows as the rows have columns; either way the permutation must be the
    # optimum (ot.emd2), and the orientation must follow the clustered side.
    data, noise = _clustered_pair(b, seed=b)
    if swap:
        data, noise = noise, data
    seen = []
    real_lsa = couplings_module.linear_sum_assignment

    def spy(cost):
        seen.append(cost.copy())
        return real_lsa(cost)

    monkeypatch.setattr(couplings_module, "linear_sum_assignment", spy)
    res = ot_coupling(data, noise, solver="lsa")
    _assert_permutation(res, noise)
    assert res.cost_after == pytest.approx(_emd2(data, noise), rel=1e-9, abs=1e-15)
    (solved,) = seen
    cost = ((data[:, None, :] - noise[None, :, :]) ** 2).sum(-1).numpy()
    rows = np.count_nonzero(np.bincount(cost.argmin(1), minlength=b))
    cols = np.count_nonzero(np.bincount(cost.argmin(0), minlength=b))
    transposed = cols > 2 * rows
    if b == 256:  # the toy's batch: the orientation switch is what makes it ~1.6x faster
        assert transposed != swap

    def reduced(c):
        c = c - c.min(1, keepdims=True)
        return c - c.min(0, keepdims=True)

    # the solver saw the row- and column-reduced matrix of the orientation chosen (the costs of
    # pairwise_sqdist and the direct ones above agree to ~1e-16)
    np.testing.assert_allclose(solved, reduced(cost.T if transposed else cost), atol=1e-12)


def test_ot_emd_iteration_limit_falls_back_explicitly():
    data, noise = _pair(30, (3,), seed=4)
    with pytest.warns(RuntimeWarning, match="fell back"):
        res = ot_coupling(data, noise, solver="emd", emd_max_iter=3)
    assert res.fell_back and "numItermax" in res.status
    _assert_permutation(res, noise)
    assert res.cost_after == pytest.approx(_emd2(data, noise), rel=1e-9)


def test_ot_recovers_a_permuted_copy_and_near_duplicates():
    # noise = a shuffled copy of data plus 1e-9 jitter; the points sit at 1e3 from the origin
    # with spacing 1e-6. Right pairs cost ~d 1e-18, wrong ones ~d 1e-12. Uncentred, the
    # |a|^2 + |b|^2 - 2ab form would carry errors ~1e-16 x 1e7 = 1e-9 >> 1e-12 (and float32
    # would merge the points); pairwise_sqdist recentres first, so ot_coupling must return
    # exactly the inverse shuffle.
    g = torch.Generator().manual_seed(5)
    b, d = 64, 10
    data = 1e3 + 1e-6 * torch.randn(b, d, generator=g, dtype=F64)
    shuffle = torch.randperm(b, generator=g)
    noise = data[shuffle] + 1e-9 * torch.randn(b, d, generator=g, dtype=F64)
    res = ot_coupling(data, noise)
    _assert_permutation(res, noise)
    assert torch.equal(shuffle[res.permutation], torch.arange(b))
    assert res.cost_after < 1e-16
    # exact copy: zero cost exactly (costs are direct differences, no cancellation)
    exact = ot_coupling(data, data[shuffle].clone())
    assert torch.equal(exact.noise, data) and exact.cost_after == 0.0


def test_ot_float32_input():
    data, noise = _pair(200, (16,), seed=6, dtype=torch.float32, shift=50.0)
    r64 = ot_coupling(data.double(), noise.double())
    # cost_dtype=float64: the float32 points are upcast exactly, so the permutation is the one of
    # the float64 copy, bitwise
    up = ot_coupling(data, noise, cost_dtype=torch.float64)
    assert torch.equal(up.permutation, r64.permutation)
    assert up.noise.dtype == torch.float32 and "float64" in up.status
    # default: a float32 cost matrix; the assignment is optimal for it and within 2 B delta of
    # the float64 optimum, delta ~ 2^-24 x (|x - m|^2 + |z - m|^2) ~ 6e-8 x 64 per entry, i.e.
    # a relative gap below 2 x 200 x 4e-6 / (200 x 32) ~ 1e-7 of the mean cost; 1e-6 bounds it.
    r32 = ot_coupling(data, noise)
    _assert_permutation(r32, noise)
    assert "float32" in r32.status
    mean64 = float(((data.double() - noise.double()[r32.permutation]) ** 2).sum(1).mean())
    assert mean64 == pytest.approx(_emd2(data.double(), noise.double()), rel=1e-6)


def test_ot_ties_still_permutation():
    # every noise row identical: all permutations are optimal; the result must still be one
    data, _ = _pair(9, (3,), seed=7)
    noise = torch.ones(9, 3, dtype=F64)
    res = ot_coupling(data, noise)
    _assert_permutation(res, noise)
    assert res.cost_after == pytest.approx(res.cost_before, rel=1e-14)
    dup = torch.cat([data[:4], data[:4], data[8:]])  # duplicated data rows: tied assignments
    noise2 = _pair(9, (3,), seed=8)[1]
    res2 = ot_coupling(dup, noise2)
    _assert_permutation(res2, noise2)
    assert res2.cost_after == pytest.approx(_emd2(dup, noise2), rel=1e-9)


# --- independent and squared cost ---------------------------------------------------------------
def test_independent_and_squared_cost():
    data, noise = _pair(11, (2, 3), seed=8)
    res = independent_coupling(data, noise)
    assert res.data is data and res.noise is noise and res.permutation is None
    manual = ((data - noise) ** 2).reshape(11, -1).sum(1)
    sq = squared_cost(data, noise)
    assert sq.shape == (11,) and sq.dtype == F64
    torch.testing.assert_close(sq, manual, rtol=1e-14, atol=0)  # same float64 sums
    assert res.cost_before == res.cost_after == pytest.approx(float(manual.mean()), rel=1e-14)
    assert squared_cost(data.float(), noise.float()).dtype == torch.float32
    # finite values whose sum overflows float32 are valid input (the finiteness check must not
    # mistake the overflow for NaN / inf)
    big = torch.full((3, 2), 3e38)
    assert independent_coupling(big, big.clone()).cost_after == 0.0


# --- generator-induced --------------------------------------------------------------------------
class _Recorder:
    """Generator that records its inputs and returns ``fn(x_t, t)``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone(), torch.is_grad_enabled()))
        return self.fn(x, t)


@pytest.mark.parametrize("mu", [0.3, 1.0])
def test_gc_with_paired_data_generator_is_ic(mu):
    data, noise = _pair(32, (3, 4), seed=9)
    x_all = data + 5.0 * noise  # VE: x_t = data + t noise

    def paired(x, t):  # the ideal "generator": looks each x_t up and returns its own data row
        rows = [int(torch.nonzero((x_all.flatten(1) == r.flatten()).all(1))[0]) for r in x]
        return data[rows].clone()

    gen = _Recorder(paired)
    res = generator_induced_coupling(
        data, noise, gen, 5.0, VEProcess(), mu=mu, generator=torch.Generator().manual_seed(0)
    )
    ic = independent_coupling(data, noise)
    assert torch.equal(res.data, ic.data) and res.noise is noise
    assert res.cost_after == ic.cost_after and res.cost_before == ic.cost_before
    assert res.gc_mask.any()  # the generator was actually used
    x, t, grad = gen.calls[0]
    # Only the GC rows go through the generator, at their own x_t and t.
    torch.testing.assert_close(x, x_all[res.gc_mask], rtol=0, atol=0)
    n_gc = int(res.gc_mask.sum())
    assert torch.equal(t, torch.full((n_gc,), 5.0, dtype=F64)) and not grad


def test_gc_mu_zero_and_one():
    data, noise = _pair(20, (2,), seed=10)
    proc = LinearProcess()
    gen = _Recorder(lambda x, t: 0.5 * x + 1.0)
    zero = generator_induced_coupling(data, noise, gen, 0.4, proc, mu=0.0)
    assert not zero.gc_mask.any() and torch.equal(zero.data, data) and zero.noise is noise
    assert gen.calls == []  # no GC row: the generator is not run
    one = generator_induced_coupling(data, noise, gen, 0.4, proc, mu=1.0)
    assert one.gc_mask.all() and one.noise is noise
    x_t = (1 - 0.4) * data + 0.4 * noise
    torch.testing.assert_close(one.data, 0.5 * x_t + 1.0, rtol=1e-15, atol=1e-15)  # same ops
    assert one.cost_after == pytest.approx(float(squared_cost(one.data, noise).mean()), rel=1e-14)


def test_gc_generator_runs_without_grad():
    data, noise = _pair(16, (2,), seed=11)
    net = torch.nn.Linear(2, 2).double()
    assert all(p.requires_grad for p in net.parameters())
    res = generator_induced_coupling(data, noise, lambda x, t: net(x), 1.0, "ve", mu=1.0)
    assert not res.data.requires_grad and res.data.grad_fn is None


@given(
    t=st.floats(0.002, 80.0),
    mu=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    per_sample=st.booleans(),
)
@example(t=0.002, mu=0.0, seed=0, per_sample=False)
@example(t=80.0, mu=1.0, seed=0, per_sample=True)
def test_gc_property_rows(t, mu, seed, per_sample):
    data, noise = _pair(24, (3, 2), seed)
    tt = torch.full((24,), t, dtype=F64) if per_sample else t
    res = generator_induced_coupling(
        data,
        noise,
        lambda x, s: -x,
        tt,
        VEProcess(),
        mu=mu,
        generator=torch.Generator().manual_seed(seed),
    )
    m = res.gc_mask
    assert m.dtype == torch.bool and m.shape == (24,)
    assert torch.equal(res.data[~m], data[~m])  # IC rows bitwise unchanged
    assert torch.equal(res.data[m], -(data + t * noise)[m])  # GC rows = generator(x_t, t)
    assert torch.equal(res.noise, noise)  # same noise
    again = generator_induced_coupling(
        data, noise, lambda x, s: -x, tt, "ve", mu=mu, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(again.gc_mask, m)  # the mask is a function of rng only


def test_gc_mask_is_bernoulli_mu():
    # k ~ Binomial(n, mu) with n = 20000, mu = 0.3: |k - n mu| <= 5 sd fails with prob < 1e-6
    n, mu = 20000, 0.3
    data = torch.zeros(n, 1, dtype=F64)
    res = generator_induced_coupling(
        data,
        data.clone(),
        lambda x, t: x,
        1.0,
        "ve",
        mu=mu,
        generator=torch.Generator().manual_seed(12),
    )
    k = int(res.gc_mask.sum())
    assert abs(k - n * mu) <= 5 * math.sqrt(n * mu * (1 - mu))


# --- Sinkhorn -----------------------------------------------------------------------------------
def test_sinkhorn_marginals_and_entropic_bound():
    data, noise = _pair(40, (2,), seed=13, shift=1.0)
    tol, reg = 1e-9, 0.05
    res = sinkhorn_coupling(
        data, noise, reg=reg, tol=tol, generator=torch.Generator().manual_seed(1)
    )
    assert not res.fell_back and res.permutation is None and res.plan.shape == (40, 40)
    w = torch.full((40,), 1 / 40, dtype=F64)
    assert float((res.plan.sum(1) - w).abs().sum()) <= tol
    assert float((res.plan.sum(0) - w).abs().sum()) <= tol
    assert bool((res.plan >= 0).all())
    # entropic bound on the mean-normalised cost M: <P, M> - OT(M) <= reg * log B, since the
    # entropy of any coupling of uniform marginals is in [log B, 2 log B]; tol * max(M) pays for
    # the residual marginal error.
    cost = ((data[:, None] - noise[None]) ** 2).sum(-1)
    scale = float(cost.mean())
    gap = float((res.plan * cost).sum()) / scale - _emd2(data, noise) / scale
    assert -tol * float(cost.max()) / scale <= gap <= reg * math.log(40) + tol * float(cost.max())
    # every output noise row is one of the input rows, drawn from the support of its plan row
    idx = torch.cdist(res.noise, noise).argmin(1)
    assert torch.equal(noise[idx], res.noise)
    assert bool((res.plan[torch.arange(40), idx] > 0).all())


def test_sinkhorn_rows_drawn_from_plan_rows():
    # B = 3, reg large enough for a spread plan; 600 independent calls: the frequency of each
    # (row j, noise k) matches P[j, k] / P[j].sum() within 5 binomial sd (fails w.p. < 1e-5).
    data, noise = _pair(3, (2,), seed=14)
    g = torch.Generator().manual_seed(2)
    n = 600
    counts = torch.zeros(3, 3)
    for _ in range(n):
        res = sinkhorn_coupling(data, noise, reg=0.5, generator=g)
        idx = torch.cdist(res.noise, noise).argmin(1)
        counts[torch.arange(3), idx] += 1
    p = (res.plan / res.plan.sum(1, keepdim=True)).float()
    assert ((counts / n - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n) + 1e-6).all()


def test_sinkhorn_failure_policies():
    data, noise = _pair(30, (2,), seed=15)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = sinkhorn_coupling(data, noise, reg=1e-4, max_iter=2)
    assert res.fell_back and "did not converge" in res.status and res.plan is None
    _assert_permutation(res, noise)
    assert res.cost_after == pytest.approx(_emd2(data, noise), rel=1e-9)
    with pytest.raises(RuntimeError, match="did not converge"):
        sinkhorn_coupling(data, noise, reg=1e-4, max_iter=2, on_failure="raise")


# --- bad input ----------------------------------------------------------------------------------
_COUPLINGS = {
    "independent": independent_coupling,
    "ot": ot_coupling,
    "sinkhorn": sinkhorn_coupling,
    "gc": lambda d, z: generator_induced_coupling(d, z, lambda x, t: x, 1.0, "ve", mu=0.5),
    "squared_cost": squared_cost,
}


@pytest.mark.parametrize("name", list(_COUPLINGS))
def test_bad_pairs_raise(name):
    fn = _COUPLINGS[name]
    data, noise = _pair(5, (3,), seed=16)
    with pytest.raises(ValueError, match="data and noise"):
        fn(data, noise[:4])
    with pytest.raises(ValueError, match="data"):
        fn(torch.where(data > 0, math.nan, data), noise)
    with pytest.raises(ValueError, match="noise"):
        fn(data, torch.full_like(noise, math.inf))
    with pytest.raises(ValueError, match="data"):
        fn(data[:0], noise[:0])
    with pytest.raises(ValueError, match="data"):
        fn(data.long(), noise.long())
    with pytest.raises(ValueError, match="dtype"):
        fn(data, noise.float())


def test_bad_arguments_raise():
    data, noise = _pair(5, (3,), seed=17)
    with pytest.raises(ValueError, match="solver"):
        ot_coupling(data, noise, solver="hungarian")
    with pytest.raises(ValueError, match="cost_dtype"):
        ot_coupling(data, noise, cost_dtype=torch.float16)
    with pytest.raises(ValueError, match="emd_max_iter"):
        ot_coupling(data, noise, solver="emd", emd_max_iter=0)
    for kw, arg in [({"reg": 0.0}, "reg"), ({"max_iter": 0}, "max_iter"), ({"tol": -1.0}, "tol")]:
        with pytest.raises(ValueError, match=arg):
            sinkhorn_coupling(data, noise, **kw)
    with pytest.raises(ValueError, match="on_failure"):
        sinkhorn_coupling(data, noise, on_failure="ignore")
    gen = lambda x, t: x  # noqa: E731
    for mu in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="mu"):
            generator_induced_coupling(data, noise, gen, 1.0, "ve", mu=mu)
    for t in (0.001, 81.0):
        with pytest.raises(ValueError, match="t must lie"):
            generator_induced_coupling(data, noise, gen, t, "ve", mu=0.5)
    with pytest.raises(ValueError, match="t must lie"):
        generator_induced_coupling(data, noise, gen, 1.0, "linear", mu=0.5)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        generator_induced_coupling(data, noise, gen, torch.ones(4, dtype=F64), "ve", mu=0.5)
    with pytest.raises(ValueError, match="gc_model"):
        generator_induced_coupling(data, noise, lambda x, t: x[:, :2], 1.0, "ve", mu=1.0)
    with pytest.raises(ValueError, match="gc_model output"):
        generator_induced_coupling(data, noise, lambda x, t: x / 0.0, 1.0, "ve", mu=1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batches", "128", "0"], "--batches [0] is invalid: use batch sizes between 1 and"),
        (["--quick", "--repeats", "2"], "--repeats 2 is invalid: use >= 3"),  # explicit wins
    ],
)
def test_bench_couplings_rejects_bad_arguments_before_any_work(tmp_path, argv, message):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "experiments" / "bench_couplings.py"),
            *argv,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and "B=" not in proc.stdout  # nothing ran, nothing written


# --- checks once and lazy costs (docs/design.md section 3) ---------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_costs_are_computed_on_first_read_and_equal_the_definition(monkeypatch):
    data, noise = _pair(12, (3,), 40)
    calls = []
    real_mean_cost = couplings_module._mean_cost
    monkeypatch.setattr(
        couplings_module, "_mean_cost", lambda d, z: calls.append(1) or real_mean_cost(d, z)
    )
    results = {
        "ic": independent_coupling(data, noise),
        "ot": ot_coupling(data, noise),
        "gc": generator_induced_coupling(
            data, noise, lambda x, t: 0.5 * x, 0.7, "ve", mu=0.5, generator=_gen(1)
        ),
    }
    assert calls == [], "a coupling computed a cost that nobody read"
    for name, res in results.items():
        before = float(squared_cost(data, noise).mean())
        after = float(squared_cost(res.data, res.noise).mean())
        assert res.cost_before == pytest.approx(before, rel=1e-14), name
        assert res.cost_after == pytest.approx(after, rel=1e-14), name
    assert results["ot"].cost_after < results["ot"].cost_before  # the input pairing, not the output
    n = len(calls)
    assert results["gc"].cost_after == results["gc"].cost_after and len(calls) == n  # cached


def test_given_costs_win_over_the_pairs():
    data, noise = _pair(4, (2,), 41)
    res = CouplingResult(data, noise, None, None, "given", costs=(3.0, 2.0))
    assert (res.cost_before, res.cost_after) == (3.0, 2.0)


def test_unchecked_couplings_give_the_checked_results():
    data, noise = _pair(16, (5,), 42)
    a, b = ot_coupling(data, noise), ot_coupling(data, noise, validate=False)
    assert torch.equal(a.permutation, b.permutation) and torch.equal(a.noise, b.noise)
    t = torch.linspace(0.1, 2.0, 16, dtype=F64)
    kw = dict(mu=0.4, process=VEProcess(t_min=0.002, t_max=80.0))
    gc_a = generator_induced_coupling(data, noise, lambda x, s: x / 2, t, generator=_gen(3), **kw)
    gc_b = generator_induced_coupling(
        data, noise, lambda x, s: x / 2, t, generator=_gen(3), validate=False, **kw
    )
    assert torch.equal(gc_a.gc_mask, gc_b.gc_mask) and torch.equal(gc_a.data, gc_b.data)
    assert 0 < int(gc_a.gc_mask.sum()) < 16


def test_checked_entry_points_still_refuse_nan():
    data, noise = _pair(6, (2,), 43)
    data[2, 1] = float("nan")
    with pytest.raises(ValueError, match="data"):
        ot_coupling(data, noise)
    with pytest.raises(ValueError, match="data"):
        generator_induced_coupling(data, noise, lambda x, s: x, 0.5, "ve", mu=1.0)
