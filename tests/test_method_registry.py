"""The method registry (gcflows.consistency.METHOD_REGISTRY) is the one place a method is added
(docs/design.md section 5), and a training step checks its batch once (section 3)."""

from __future__ import annotations

import pytest
import torch

import gcflows.consistency as consistency_module
import gcflows.continuous as continuous_module
import gcflows.couplings as couplings_module
from gcflows import gmm as G
from gcflows.consistency import (
    METHOD_REGISTRY,
    ConsistencyModel,
    ConsistencyObjective,
    ContinuousConfig,
    Method,
    ObjectiveConfig,
    register_method,
)
from gcflows.continuous import ContinuousObjective
from gcflows.couplings import CouplingResult
from gcflows.networks import ToyMLP
from gcflows.processes import LinearProcess, VEProcess
from gcflows.training import TrainConfig, train

VE = VEProcess(0.002, 80.0)


def _reverse_noise(objective, data, noise, t, gc_model, generator) -> CouplingResult:
    """A coupling no objective knows: noise row j goes to data row B - 1 - j."""
    return CouplingResult(data, noise.flip(0), torch.arange(noise.shape[0]).flip(0), None, "rev")


@pytest.fixture
def reversed_method():
    """Register the dummy method in the one place, and only there; removed afterwards."""
    method = register_method(Method("reversed", coupling="reversed", couple=_reverse_noise))
    yield method
    METHOD_REGISTRY.pop("reversed")


def _model(dim: int, process, seed: int = 0) -> ConsistencyModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConsistencyModel(ToyMLP(dim, hidden=16, depth=2, time_scale=10.0), process)


def test_a_method_is_unknown_until_registered():
    with pytest.raises(ValueError, match="method='reversed' is invalid: use one of"):
        TrainConfig(method="reversed")
    with pytest.raises(ValueError, match="reversed"):
        ConsistencyObjective(VE, "reversed", total_steps=10)
    with pytest.raises(ValueError, match="that name is registered"):
        register_method(Method("ct"))
    with pytest.raises(ValueError, match="Method.needs"):
        Method("bad", target="velocity")  # a CD-like target without velocity=


@pytest.mark.parametrize("process", [VE, LinearProcess()], ids=lambda p: p.name)
def test_a_registered_method_is_its_coupling_then_ct_in_both_objectives(reversed_method, process):
    """The dummy method's loss equals CT's on the reversed noise, discrete and continuous (same
    draws: the coupling draws nothing), and differs from CT on the noise as given."""
    model = _model(3, process)
    g = torch.Generator().manual_seed(4)
    data = torch.randn(12, 3, generator=g) * torch.tensor([1.0, 0.5, 2.0]) + 0.3
    noise = torch.randn(12, 3, generator=g)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731

    def discrete(method, n):
        obj = ConsistencyObjective(
            process, method, total_steps=50, s0=4, s1=32, distance="squared_l2"
        )
        return obj(model, data, 30, generator=gen(), noise=n)

    rev, ct = discrete("reversed", noise), discrete("ct", noise.flip(0))
    assert rev.coupling.status == "rev" and rev.coupling.gc_mask is None
    torch.testing.assert_close(rev.loss, ct.loss, rtol=0, atol=0)
    other = discrete("ct", noise).loss.detach()
    assert abs(float(other - ct.loss.detach())) > 1e-3 * float(other)  # the coupling matters
    assert rev.diagnostics["gc_mask"].sum() == 0

    sub = {"tangent_norm": None, "weight": lambda t: 0.5 + t}
    cont = {
        m: ContinuousObjective(process, m, mu=0.5, distance="pseudo_huber", **sub)(
            model, data, 3, generator=gen(), noise=n
        )
        for m, n in (("reversed", noise), ("ct", noise.flip(0)))
    }
    torch.testing.assert_close(cont["reversed"].loss, cont["ct"].loss, rtol=0, atol=0)
    torch.testing.assert_close(
        cont["reversed"].diagnostics["pair_cost"], ((data - noise.flip(0)) ** 2).sum(1)
    )


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
def test_a_registered_method_trains_through_the_library(reversed_method, continuous):
    """TrainConfig(method=...) accepts the registered method and gcflows.training.train runs it
    (make_objective needs no change): two optimiser steps that change the weights."""
    model = _model(2, VE)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    cfg = TrainConfig(
        method="reversed",
        continuous=continuous,
        distance="squared_l2",
        total_steps=2,
        batch_size=8,
        s0=2,
        s1=8,
        lr=1e-3,
        tangent_warmup=4,
        progress=False,
    )
    assert cfg.objective.continuous == (ContinuousConfig(tangent_warmup=4) if continuous else None)
    res = train(
        cfg,
        model,
        G.two_gaussians_1to2().to(dtype=torch.float32).sample,
        resume=None,
        callbacks=[lambda info: losses.append(info.loss)],
    )
    assert res.step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_continuous_objective_takes_the_discrete_config_and_its_distance():
    """One ObjectiveConfig: the continuous objective reads its method, mu, distance (pseudo-Huber
    by default, as in discrete time: C = 1 / (2c), c = 0.00054 sqrt(d)) and p_mean / p_std."""
    cfg = ObjectiveConfig(method="gc", mu=0.3, p_mean=0.2, p_std=0.7, total_steps=10)
    obj = ContinuousObjective(VE, cfg)
    assert obj.config.mu == 0.3 and obj.continuous == ContinuousConfig()
    assert obj.constant(4) == pytest.approx(1.0 / (2 * 0.00054 * 2.0), rel=1e-12)
    assert ContinuousObjective(VE, "ct").constant(4) == obj.constant(4)  # the default, aligned
    with pytest.raises(ValueError, match="inside the ObjectiveConfig"):
        ContinuousObjective(VE, cfg, tangent_norm=None)
    with pytest.raises(ValueError, match=r"ContinuousObjective.tangent_warmup=-1 is invalid"):
        ContinuousObjective(VE, "ct", tangent_warmup=-1)
    with pytest.raises(ValueError, match="ContinuousObjective"):
        ConsistencyObjective(VE, ObjectiveConfig(method="ct", continuous=ContinuousConfig()))
    with pytest.raises(ValueError, match=r"TrainConfig.tangent_norm=0.0 is invalid"):
        TrainConfig(continuous=True, tangent_norm=0.0)


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize("method", ["ct", "ot", "gc"])
def test_a_training_step_checks_its_batch_once(method, continuous, monkeypatch):
    """train_step checks the data batch (NaN / inf, the same decision on every rank) and calls the
    objective with validate=False: neither objective nor any coupling checks it again
    (docs/design.md section 3; the pattern of test_objective_checks_the_batch_once)."""

    def checked_again(*args, **kwargs):
        raise AssertionError("the batch was checked again on the training step")

    monkeypatch.setattr(couplings_module, "pair", checked_again)
    monkeypatch.setattr(couplings_module, "finite", checked_again)
    seen = []
    for module in (consistency_module, continuous_module):
        real = module.finite
        monkeypatch.setattr(
            module, "finite", lambda x, name, real=real: seen.append(name) or real(x, name)
        )
    isfinite_calls = []
    real_isfinite = torch.isfinite

    def counting_isfinite(x):
        isfinite_calls.append(tuple(x.shape))
        return real_isfinite(x)

    cfg = TrainConfig(
        method=method,
        continuous=continuous,
        total_steps=1,
        batch_size=8,
        s0=2,
        s1=8,
        progress=False,
        distance="squared_l2",
    )
    model = _model(2, VE)
    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    res = train(cfg, model, G.two_gaussians_1to2().to(dtype=torch.float32).sample, resume=None)
    assert res.step == 1
    # no objective-level check of the batch (a new grid is checked once when it is built)
    assert [name for name in seen if name != "grid"] == []
    assert isfinite_calls.count((8, 2)) == 1  # the batch: once, by the step


def test_an_unknown_setting_names_the_two_configs():
    """The old name of the tangent warm-up is refused with the new name in the message."""
    message = r"settings=\['warmup_steps'\] is invalid: .*tangent_warmup"
    with pytest.raises(ValueError, match=message):
        ContinuousObjective(VE, "ct", warmup_steps=10)
