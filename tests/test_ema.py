"""The GC generator's EMA: warm-up decay (ema-pytorch 0.2.3 semantics), constant mode, resume."""

import math

import pytest
import torch
from torch import nn

from gcflows.ema import EMA, ema_decay, weight_on_first


def _scalar_model(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m.double()


def _weight_on_step0(ema_kwargs, steps: int) -> float:
    """Run the EMA on a network equal to 1 at step 0 and 0 afterwards: the average's value is the
    weight it gives to the step-0 network."""
    model = _scalar_model(1.0)
    ema = EMA(model, **ema_kwargs)
    ema.update(model, 0)
    with torch.no_grad():
        model.weight.zero_()
    for k in range(1, steps + 1):
        ema.update(model, k)
    return float(ema.module.weight)


def test_decay_closed_form():
    assert ema_decay(0) == 0.0  # the first update copies the network
    assert ema_decay(999) == pytest.approx(1 - 1000 ** (-2 / 3), abs=1e-15)
    assert ema_decay(100_000) == pytest.approx(0.99954, abs=5e-6)  # docs/paper.md section 5
    assert ema_decay(10**9) == 0.9999  # capped at beta
    assert ema_decay(5, warmup=False) == 0.9999


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        (dict(beta=0.9999, update_every=1, warmup=False), {1000: 0.90, 10000: 0.37, 25000: 0.08}),
        (dict(beta=0.9999, update_every=5, warmup=True), {1000: 5e-3, 10000: 5e-6, 25000: 5e-8}),
    ],
)
def test_weight_on_initial_network_matches_quoted_numbers(kwargs, want):
    for steps, value in want.items():
        closed = weight_on_first(steps, **kwargs)
        # the quoted numbers (0.90 / 0.37 / 0.08 and 5e-3 / 5e-6 / 5e-8) are rounded
        assert closed == pytest.approx(value, rel=0.06)
    # the module reproduces the closed form (float64 scalar network), at 1k and 25k steps
    for steps in (1000, 25000):
        assert _weight_on_step0(kwargs, steps) == pytest.approx(
            weight_on_first(steps, **kwargs), rel=1e-9
        )


def test_update_every_skips_and_buffers_copied():
    model = nn.BatchNorm1d(2).double()
    ema = EMA(model, update_every=5)
    with torch.no_grad():
        model.running_mean.fill_(3.0)
        model.weight.fill_(2.0)
    assert ema.update(model, 0) is True  # decay 0: a copy
    assert torch.equal(ema.module.weight, model.weight)
    assert torch.equal(ema.module.running_mean, model.running_mean)
    with torch.no_grad():
        model.weight.fill_(0.0)
    for k in range(1, 5):
        assert ema.update(model, k) is False
    assert float(ema.module.weight[0]) == 2.0
    assert ema.update(model, 5) is True
    d = 1 - 6 ** (-2 / 3)
    assert float(ema.module.weight[0]) == pytest.approx(2.0 * d, rel=1e-12)


def test_exact_resume_and_step_checks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 3))
    ema = EMA(net, update_every=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    snapshots = {}
    for k in range(12):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        ema.update(net, k)
        if k == 5:
            snapshots = {n: v.clone() for n, v in ema.state_dict().items()}
            net_state = {n: v.clone() for n, v in net.state_dict().items()}
            rng = torch.get_rng_state()
    final = {n: v.clone() for n, v in ema.state_dict().items()}
    # resume from step 5 in a fresh EMA
    net.load_state_dict(net_state)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    resumed = EMA(nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 3)), update_every=2)
    resumed.load_state_dict(snapshots)
    torch.set_rng_state(rng)
    with pytest.raises(ValueError, match="step"):
        resumed.update(net, 5)  # already done
    for k in range(6, 12):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        resumed.update(net, k)
    for n, v in resumed.state_dict().items():
        assert torch.equal(v, final[n]), n


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=1.0), "beta"),
        (dict(update_every=0), "update_every"),
        (dict(power=-1.0), "power"),
        (dict(warmup=1), "warmup"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(nn.Linear(1, 1), **kwargs)


def test_weight_on_first_is_product_of_decays():
    w = weight_on_first(20, update_every=5)
    want = math.prod(1 - (1 + k) ** (-2 / 3) for k in (5, 10, 15, 20))
    assert w == pytest.approx(want, rel=1e-12)
