"""The vectorized ensemble equals sequential training of each seed with the library objective."""

import pytest
import torch

from gcflows.ensemble import EnsembleSpec, train_ensemble, train_sequential
from gcflows.gmm import get_preset

CASES = [
    ("ct", "ema"),
    ("cd", "ema"),
    ("ot", "ema"),
    ("gc", "ema"),
    ("gc", "const_ema"),
    ("gc", "online"),
    ("gc", "ideal"),
]


def _spec(method, gc_model):
    return EnsembleSpec(
        method=method,
        gc_model=gc_model,
        mu=0.5,
        steps=8,
        batch=32,
        hidden=32,
        depth=2,
        lr=1e-3,
        ema_every=2,
        ideal_steps=4,
        s0=2,
        s1=8,
    )


@pytest.mark.parametrize(("method", "gc_model"), CASES)
def test_each_seed_equals_its_sequential_run(method, gc_model):
    target = get_preset("random_16")
    spec = _spec(method, gc_model)
    ens = train_ensemble(target, spec, [3, 5])
    for i, seed in enumerate([3, 5]):
        model, ema, losses = train_sequential(target, spec, seed)
        ref = model.state_dict()
        for k, v in ens.params.items():
            torch.testing.assert_close(v[i].detach(), ref[k], rtol=1e-5, atol=1e-6)
        got = torch.stack(ens.losses)[:, i]
        torch.testing.assert_close(got, torch.tensor(losses), rtol=1e-5, atol=1e-7)
        if ema is not None:
            ref_ema = ema.module.state_dict()
            for k, v in ens.ema.items():
                torch.testing.assert_close(v[i], ref_ema[k], rtol=1e-5, atol=1e-6)
            # the average is not the online network
            key = "backbone.out.weight"
            assert not torch.allclose(ens.ema[key][i], ens.params[key][i].detach())
    # the seeds differ (different initial weights and draws)
    assert not torch.allclose(
        ens.params["backbone.out.weight"][0], ens.params["backbone.out.weight"][1]
    )


def test_seed_model_and_apply_agree():
    target = get_preset("random_16")
    spec = _spec("ct", "ema")
    ens = train_ensemble(target, spec, [0, 1, 2])
    x = torch.randn(3, 5, 16)
    t = torch.full((3, 5), 0.7)
    out = ens.apply(x, t)
    for i in range(3):
        with torch.no_grad():
            ref = ens.seed_model(i)(x[i], t[i])
        torch.testing.assert_close(out[i].detach(), ref, rtol=1e-5, atol=1e-6)


def test_callback_steps_and_bad_arguments():
    target = get_preset("random_16")
    seen = []
    train_ensemble(
        target,
        _spec("ct", "ema"),
        [0],
        callback=lambda k, e: seen.append(k),
        callback_steps=[0, 4, 8],
    )
    assert seen == [0, 4, 8]
    with pytest.raises(ValueError, match="seeds"):
        train_ensemble(target, _spec("ct", "ema"), [1, 1])
    with pytest.raises(ValueError, match="method"):
        train_ensemble(target, _spec("xx", "ema"), [0])
    with pytest.raises(ValueError, match="gc_model"):
        train_ensemble(target, _spec("gc", "teacher"), [0])
