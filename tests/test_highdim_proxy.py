"""gcflows.highdim_proxy: the couplings' pairs, the closed-form reference, the bookkeeping rows
and the verdicts against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch

from gcflows import highdim_proxy as hp
from gcflows.gmm import GaussianMixture
from gcflows.processes import get_process


def test_ic_pairs_are_data_plus_t_noise():
    data = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.5, 2.5]], dtype=torch.float64)
    x, z = hp.make_sampler("ic", data, ideal_steps=4)(0.7, 50, torch.Generator().manual_seed(0))
    x0 = x - 0.7 * z
    # every x0 is one of the data rows (resampled), up to float64 rounding of x - t z
    dist = torch.cdist(x0, data).min(1).values
    assert float(dist.max()) < 1e-12 and x.shape == (50, 2)


def test_batch_ot_pairs_are_monotone_in_one_dimension():
    """In 1-D the optimal assignment of squared cost pairs sorted data with sorted noise, within
    each batch of 8 (20 pairs: the last batch cut to 4)."""
    data = torch.linspace(-3.0, 3.0, 64, dtype=torch.float64)[:, None]
    t = 0.3
    x, z = hp.make_sampler("ot8", data, ideal_steps=4)(t, 20, torch.Generator().manual_seed(1))
    assert x.shape == (20, 1)
    x0 = (x - t * z)[:, 0]
    for lo in range(0, 16, 8):
        a, b = x0[lo : lo + 8], z[lo : lo + 8, 0]
        assert torch.equal(torch.argsort(a), torch.argsort(b))


def test_gc_pairs_replace_the_data_by_the_generator():
    """mu = 1 with a constant generator c: x_t = c + t z for every pair; mu = 0: IC pairs."""
    data = torch.tensor([[5.0, 5.0]], dtype=torch.float64)

    def model(x, t):
        return torch.full_like(x, -2.0)

    x, z = hp.make_sampler("gc1", data, 4, model)(0.5, 30, torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, -2.0 + 0.5 * z, rtol=0, atol=1e-12)
    x, z = hp.make_sampler("gc0", data, 4, model)(0.5, 30, torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, 5.0 + 0.5 * z, rtol=0, atol=1e-12)


def test_closed_form_is_the_weighted_gaussian_value():
    """Two isotropic components (weights 0.3 / 0.7, std 0.5 / 1.5) far apart, GC mu = 1 ideal:
    sum_k w_k d c_k^2 s_k^2 / (c_k^2 s_k^2 + (1 + c_k)^2 t^2), c_k^2 = (s_k^2 + t_min^2) /
    (s_k^2 + t^2) (gcflows.regression.gaussian_gc_proxy, exact at mu = 1; tolerance 1e-9: the
    Monte Carlo half-width is zero at mu = 1)."""
    d, t = 3, 0.4
    means = torch.tensor([[0.0] * d, [50.0] * d], dtype=torch.float64)
    mix = GaussianMixture([0.3, 0.7], means, stds=torch.tensor([0.5, 1.5], dtype=torch.float64))
    t_min = get_process("ve").t_min
    want = 0.0
    for w, s in ((0.3, 0.5), (0.7, 1.5)):
        c = math.sqrt((s * s + t_min**2) / (s * s + t * t))
        want += w * d * c * c * s * s / (c * c * s * s + (1 + c) ** 2 * t * t)
    value, _ = hp.closed_form(mix, "gc1-ideal", t)
    assert value == pytest.approx(want, rel=1e-9)
    assert hp.closed_form(mix, "gc1", t) is None  # a trained generator: no closed form
    assert hp.non_mixing(mix, t)


def test_proxy_couplings_per_target():
    cfg = dict(couplings=["ic", "ot512", "ot2048", "gc1-ideal", "gc0.5-ideal"])
    assert hp.proxy_couplings(cfg, "digits") == ["ic", "ot512", "ot2048"]
    assert hp.proxy_couplings(cfg, "random_3072") == ["ic", "ot512", "gc1-ideal"]
    assert hp.proxy_couplings(cfg, "random_64") == cfg["couplings"]


def test_proxy_rows_are_per_coordinate():
    est = SimpleNamespace(
        times=[0.1, 1.0],
        value=[8.0, 2.0],
        half_width=[0.4, 0.2],
        value_half=[8.8, 2.0],
        margin=[0.8, 0.0],
        converged=[False, True],
        n_train=[64, 128],
        steps=[10, 20],
        capped=[True, False],
    )
    rows = hp.proxy_rows("random_16", 4, "ic", est, 1.26)
    assert [r["proxy_per_d"] for r in rows] == [2.0, 0.5]
    assert [r["half_width_per_d"] for r in rows] == [0.1, 0.05]
    assert [r["margin_per_d"] for r in rows] == [0.2, 0.0]
    assert [r["half_pairs_per_d"] for r in rows] == [2.2, 0.5]
    assert [r["n_train"] for r in rows] == [64, 128] and rows[0]["fit_s"] == 1.3
    assert [r["converged"] for r in rows] == [False, True] and rows[1]["t"] == 1.0


def test_verdict_counts_the_times_where_the_order_holds():
    def curve(values, hw=0.1):
        return dict(value=values, half_width=[hw] * len(values), margin=[0.0] * len(values))

    # t = 0.1: GC 1 < OT 2 < IC 3 separated; t = 1: GC and OT overlap (1.9 vs 2.0, hw 0.1)
    curves = {
        "m": {"ic": curve([3.0, 4.0]), "ot512": curve([2.0, 2.0]), "gc1-ideal": curve([1.0, 1.9])}
    }
    rows = hp.ordering_verdicts(curves, [0.1, 1.0])
    assert rows[0]["order"] == "gc1-ideal < ot512 < ic" and rows[0]["gc<ot<ic"]
    assert rows[1]["order"] == "gc1-ideal ~ ot512 < ic" and not rows[1]["gc<ot<ic"]
    assert rows[1]["gc/ic"] == pytest.approx(1.9 / 4.0)
    (v,) = hp.target_verdict(rows)
    assert v["verdict"] == "holds at 1 of 2 times" and v["held"] == 1 and v["of"] == 2
