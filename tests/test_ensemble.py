"""The seed ensemble equals sequential training of each seed with the library objective.

Tolerance: the ensemble runs each layer as one ``torch.baddbmm`` over the seeds and Adam as one
fused kernel over the stacked weights, the sequential run ``addmm`` per seed and the
multi-tensor (foreach) Adam; the same products summed in another order, and Adam's update
computed by another kernel, differ by float32 rounding (a few ulp per step). ``rtol = 1e-5`` and
``atol = 1e-6`` (weights of order 0.1 and Adam steps of ``lr = 1e-3``) allow that over 8
steps while a wrong draw, a wrong order of draws or a mixed-up seed changes the weights by
``~lr`` per step and the losses by their whole size.
"""

import math

import pytest
import torch
from torch import nn

from gcflows.ensemble import (
    EnsembleSpec,
    SeedStackedLinear,
    _Sampler,
    stack_seeds,
    train_ensemble,
    train_sequential,
)
from gcflows.gmm import GaussianMixture, get_preset
from gcflows.networks import ToyMLP

TOL = dict(rtol=1e-5, atol=1e-6)

CASES = [
    ("ct", "ema"),
    ("cd", "ema"),
    ("ot", "ema"),
    ("gc", "ema"),
    ("gc", "const_ema"),
    ("gc", "online"),
    ("gc", "ideal"),
]


def _spec(method, gc_model, **kw):
    base = dict(
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
    return EnsembleSpec(**{**base, **kw})


def _rotated_mixture(dim=6, k=3):
    """Full covariances: ``GaussianMixture.sample`` rotates each row by its component's basis."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs=covs)


def _assert_seeds_match(ens, target, spec, seeds):
    for i, seed in enumerate(seeds):
        model, ema, losses = train_sequential(target, spec, seed)
        ref = model.state_dict()
        for k, v in ens.params.items():
            torch.testing.assert_close(v[i].detach(), ref[k], **TOL)
        got = torch.stack(ens.losses)[:, i]
        torch.testing.assert_close(got, torch.tensor(losses), rtol=1e-5, atol=1e-7)
        if ema is not None:
            ref_ema = ema.module.state_dict()
            for k, v in ens.ema.items():
                torch.testing.assert_close(v[i], ref_ema[k], **TOL)
            # the average is not the online network
            key = "backbone.out.weight"
            assert not torch.allclose(ens.ema[key][i], ens.params[key][i].detach())


@pytest.mark.parametrize(("method", "gc_model"), CASES)
def test_each_seed_equals_its_sequential_run(method, gc_model):
    target = get_preset("random_16")
    spec = _spec(method, gc_model)
    ens = train_ensemble(target, spec, [3, 5])
    _assert_seeds_match(ens, target, spec, [3, 5])
    # the seeds differ (different initial weights and draws)
    assert not torch.allclose(
        ens.params["backbone.out.weight"][0], ens.params["backbone.out.weight"][1]
    )


def test_rotated_mixture_and_no_prefetch_match_sequential():
    """The batched mixture arithmetic (rotation grouped by component) equals ``sample``, with the
    draws prefetched in a thread or not."""
    target = _rotated_mixture()
    spec = _spec("gc", "online", hidden=16, depth=1, steps=6)
    a = train_ensemble(target, spec, [0, 7, 2], prefetch=True)
    b = train_ensemble(target, spec, [0, 7, 2], prefetch=False)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    _assert_seeds_match(a, target, spec, [0, 7, 2])


def test_sampler_equals_mixture_sample():
    target = _rotated_mixture()
    spec = _spec("ct", "ema", batch=64)
    gens = [torch.Generator().manual_seed(s) for s in (4, 9)]
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    data, noise, idx, mask = _Sampler(target, spec)(probs, gens)
    for i, s in enumerate((4, 9)):
        g = torch.Generator().manual_seed(s)
        ref = target.sample(64, generator=g).float()
        torch.testing.assert_close(data[i], ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(noise[i], torch.randn(ref.shape, generator=g))
        assert torch.equal(idx[i], torch.multinomial(probs, 64, replacement=True, generator=g))
    assert not mask.any()


def test_stacked_linear_and_stack_seeds():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 3) for _ in range(4)]
    stacked = SeedStackedLinear(
        torch.stack([m.weight.detach() for m in layers]),
        torch.stack([m.bias.detach() for m in layers]),
    )
    x = torch.randn(4 * 7, 5)
    y = stacked(x)
    for i, m in enumerate(layers):
        torch.testing.assert_close(y[7 * i : 7 * i + 7], m(x[7 * i : 7 * i + 7]), **TOL)
    with pytest.raises(ValueError, match="S = 4"):
        stacked(torch.randn(6, 5))
    nets = [ToyMLP(3, hidden=8, depth=1) for _ in range(2)]
    both = stack_seeds(nets)
    xx, cc = torch.randn(2 * 5, 3), torch.randn(2 * 5)
    for i, net in enumerate(nets):
        sl = slice(5 * i, 5 * i + 5)
        torch.testing.assert_close(both(xx, cc)[sl], net(xx[sl], cc[sl]), **TOL)
    with pytest.raises(ValueError, match="dropout"):
        stack_seeds([ToyMLP(3, hidden=8, depth=1, dropout=0.1)])
    with pytest.raises(ValueError, match="not in an nn.Linear"):
        stack_seeds([nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))])


def test_seed_model_and_apply_agree():
    target = get_preset("random_16")
    spec = _spec("ct", "ema")
    ens = train_ensemble(target, spec, [0, 1, 2])
    x = torch.randn(3, 5, 16)
    t = torch.full((3, 5), 0.7)
    out = ens.apply(x, t)
    ema_like = {k: v.detach() * 0.5 for k, v in ens.params.items()}
    out_half = ens.apply(x, t, ema_like)
    for i in range(3):
        with torch.no_grad():
            ref = ens.seed_model(i)(x[i], t[i])
        torch.testing.assert_close(out[i].detach(), ref, **TOL)
        model = ens.seed_model(i)
        model.load_state_dict({k: v[i] for k, v in ema_like.items()})
        with torch.no_grad():
            torch.testing.assert_close(out_half[i], model(x[i], t[i]), **TOL)
    with pytest.raises(ValueError, match="x"):
        ens.apply(torch.randn(2, 5, 16), t[:2])
    with pytest.raises(ValueError, match="t"):
        ens.apply(x, t[:, :4])


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
    seen_seq = []
    train_sequential(
        target,
        _spec("ct", "ema", steps=3),
        0,
        callback=lambda k, m: seen_seq.append((k, type(m).__name__)),
        callback_steps=[1, 3],
    )
    assert seen_seq == [(1, "ConsistencyModel"), (3, "ConsistencyModel")]
    with pytest.raises(ValueError, match="seeds"):
        train_ensemble(target, _spec("ct", "ema"), [1, 1])
    with pytest.raises(ValueError, match="method"):
        train_ensemble(target, _spec("xx", "ema"), [0])
    with pytest.raises(ValueError, match="gc_model"):
        train_ensemble(target, _spec("gc", "teacher"), [0])


def test_recipe_options_match_sequential():
    """Learning-rate warm-up and cosine decay, a stretched curriculum and the evaluation EMA:
    each seed's weights, losses and evaluation EMA equal its sequential run (same tolerance)."""
    target = get_preset("random_16")
    spec = _spec(
        "gc",
        "online",
        steps=10,
        lr_schedule="cosine",
        lr_warmup=3,
        curriculum_steps=30,
        s1=16,
        eval_ema=0.9,
    )
    ens = train_ensemble(target, spec, [1, 4])
    _assert_seeds_match(ens, target, spec, [1, 4])
    for i, seed in enumerate((1, 4)):
        model, _, _ = train_sequential(target, spec, seed)
        ref = model.eval_ema.module.state_dict()
        for k, v in ens.eval_ema.items():
            torch.testing.assert_close(v[i], ref[k], **TOL)
        # the evaluation EMA is an average, not the online weights
        key = "backbone.out.weight"
        assert not torch.allclose(ens.eval_ema[key][i], ens.params[key][i].detach())
    # without eval_ema none is kept
    assert train_ensemble(target, _spec("ct", "ema", steps=2), [0]).eval_ema is None


def test_eval_ema_is_the_warmup_average():
    """The evaluation EMA follows gcflows.ema's rule at every step: copies at the first two
    updates (the authors' re-copy), then the warm-up decays d_k = min(beta, 1 - (1 + k)^(-2/3)):
    checked against the online weights recorded at every step (float64 arithmetic here, float32
    there: rtol 1e-5)."""
    from gcflows.ema import ema_decay

    target = get_preset("random_16")
    spec = _spec("ct", "ema", steps=6, eval_ema=0.5)
    thetas = []
    ens = train_ensemble(
        target,
        spec,
        [2],
        callback=lambda step, e: thetas.append(e.params["backbone.out.bias"][0].detach().clone()),
        callback_steps=range(1, 7),
    )
    avg = torch.zeros_like(thetas[0], dtype=torch.float64)
    for k, theta in enumerate(thetas):
        d = 0.0 if k < 2 else ema_decay(k, 0.5, warmup=True)  # k = 0, 1: copies
        avg = d * avg + (1 - d) * theta.double()
    got = ens.eval_ema["backbone.out.bias"][0].double()
    torch.testing.assert_close(got, avg, rtol=1e-5, atol=1e-7)
    # beta 0.5 caps the decay from step 1 on: the last weight is 0.5, not the warm-up's 1 - 7^-2/3
    assert ema_decay(5, 0.5) == 0.5


def test_learning_rate_schedule_closed_form():
    from gcflows.ensemble import learning_rate

    spec = _spec("ct", "ema", steps=100, lr=2e-3, lr_schedule="cosine", lr_warmup=10)
    assert learning_rate(spec, 0) == pytest.approx(2e-3 * 0.1 * 0.5 * (1 + math.cos(0)))
    assert learning_rate(spec, 9) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert learning_rate(spec, 50) == pytest.approx(1e-3)
    assert 0 < learning_rate(spec, 99) < 2e-3 * 1e-3
    const = _spec("ct", "ema", steps=100, lr=2e-3)
    assert learning_rate(const, 0) == learning_rate(const, 99) == 2e-3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("lr", 0.0),
        ("ema_beta", 1.0),
        ("ema_beta", 1.5),
        ("ema_beta", -0.1),
        ("const_ema_every", -1),
        ("const_ema_every", 0),
        ("ema_every", 0),
        ("sigma_data", float("inf")),
        ("eval_ema", 1.0),
        ("eval_ema", "0.9"),
        ("lr_schedule", "step"),
        ("lr_warmup", -1),
        ("lr_warmup", 8),  # = steps: no step left at the full rate
        ("curriculum_steps", 0),
        ("s0", 9),  # > s1 = 8
        ("mu", 1.5),
    ],
)
def test_spec_rejects_what_cannot_work(field, value):
    with pytest.raises(ValueError, match=rf"EnsembleSpec\.{field}="):
        _spec("gc", "ema", **{field: value}).validate()
    # train_ensemble validates before any work
    with pytest.raises(ValueError, match=rf"EnsembleSpec\.{field}="):
        train_ensemble(get_preset("random_16"), _spec("gc", "ema", **{field: value}), [0])


def test_non_finite_loss_stops_with_the_library_error():
    """A learning rate that blows the weights up: the run stops at the first non-finite loss
    with NonFiniteLossError (the error gcflows.training.train raises), naming step and seeds;
    the sequential reference stops at the same step."""
    from gcflows.training import NonFiniteLossError

    target = get_preset("random_16")
    spec = _spec("ct", "ema", lr=1e30, steps=6)
    msg = r"step \d+: non-finite loss for seeds \["
    with pytest.raises(NonFiniteLossError, match=msg) as ens_err:
        train_ensemble(target, spec, [0, 1])
    with pytest.raises(NonFiniteLossError) as seq_err:
        train_sequential(target, spec, 0)
    assert 1 <= ens_err.value.step < 6
    assert seq_err.value.step == ens_err.value.step
