"""The one EMA (gcflows.ema): the authors' rule (ema-pytorch 0.2.3 as they use it), the plain
constant EMA, the fast path, the state, and the same rule in the seed ensemble."""

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gcflows.ema import EMA, EMARule, ema_decay, foreach_update_, weight_on_first
from gcflows.ensemble import EnsembleSpec, train_ensemble
from gcflows.gmm import get_preset


def _scalar_model(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m.double()


def _weight_on_step(ema_kwargs, steps: int, marked: int) -> float:
    """Run the EMA on a network equal to 1 at step ``marked`` (-1: the network the EMA is built
    from) and 0 at every other step: the average's value is the weight it gives to that
    network."""
    model = _scalar_model(1.0 if marked == -1 else 0.0)
    ema = EMA(model, **ema_kwargs)
    for k in range(steps + 1):
        with torch.no_grad():
            model.weight.fill_(1.0 if k == marked else 0.0)
        ema.update(model, k)
    return float(ema.module.weight)


def test_decay_closed_form():
    assert ema_decay(0) == 0.0
    assert ema_decay(999) == pytest.approx(1 - 1000 ** (-2 / 3), abs=1e-15)
    assert ema_decay(100_000) == pytest.approx(0.99954, abs=5e-6)  # docs/paper.md section 5.3
    assert ema_decay(10**9) == 0.9999  # capped at beta
    assert ema_decay(5, warmup=False) == 0.9999


AUTHORS = dict(beta=0.9999, update_every=5, warmup=True)
CONSTANT = dict(beta=0.9999, update_every=1, warmup=False)


@pytest.mark.parametrize(
    ("kwargs", "marked", "want", "rel"),
    [
        # quoted in the ema.py docstring and docs/highdim.md (two digits: rel 3 %)
        (CONSTANT, 0, {1000: 0.90, 10000: 0.37, 25000: 0.08}, 0.03),
        # the authors' rule re-copies at step 5: the step-5 network is the earliest one left
        (AUTHORS, 5, {1000: 7.4e-3, 10000: 7.2e-6, 25000: 7.1e-8}, 0.01),
    ],
)
def test_weight_on_early_networks_matches_quoted_numbers(kwargs, marked, want, rel):
    for steps, value in want.items():
        assert weight_on_first(steps, **kwargs) == pytest.approx(value, rel=rel)
    # the module reproduces the closed form (float64 scalar network), at 1k and 25k steps
    for steps in (1000, 25000):
        got = _weight_on_step(kwargs, steps, marked)
        assert got == pytest.approx(weight_on_first(steps, **kwargs), rel=1e-9)


def test_authors_rule_leaves_nothing_of_the_initial_and_step0_networks():
    for marked in (-1, 0):
        assert _weight_on_step(AUTHORS, 1000, marked) == 0.0
    # the plain EMA copies once: the network it was built from is gone after step 0 too
    assert _weight_on_step(CONSTANT, 1000, -1) == 0.0


def test_weight_on_first_is_product_of_decays():
    w = weight_on_first(20, update_every=5)
    want = math.prod(1 - (1 + k) ** (-2 / 3) for k in (10, 15, 20))  # after the re-copy at 5
    assert w == pytest.approx(want, rel=1e-12)
    w = weight_on_first(20, beta=0.9, update_every=5, warmup=False)
    assert w == pytest.approx(0.9**4, rel=1e-12)  # lerps at 5, 10, 15, 20 after the copy at 0


def _bn_model() -> nn.Module:
    return nn.BatchNorm1d(2).double()


def _set(model: nn.Module, weight: float, mean: float, tracked: int) -> None:
    with torch.no_grad():
        model.weight.fill_(weight)
        model.running_mean.fill_(mean)
        model.num_batches_tracked.fill_(tracked)


def test_authors_rule_copies_twice_then_lerps_float_buffers_too():
    model = _bn_model()
    ema = EMA(model, update_every=5)
    _set(model, 2.0, 3.0, 7)
    assert ema.update(model, 0) is True  # the copy branch
    assert float(ema.module.weight[0]) == 2.0 and float(ema.module.running_mean[0]) == 3.0
    _set(model, 0.0, 1.0, 9)
    for k in range(1, 5):
        assert ema.update(model, k) is False
    assert float(ema.module.weight[0]) == 2.0
    _set(model, 4.0, 5.0, 11)
    assert ema.update(model, 5) is True  # the re-copy: exactly the step-5 network
    assert float(ema.module.weight[0]) == 4.0 and float(ema.module.running_mean[0]) == 5.0
    _set(model, 1.0, -1.0, 13)
    for k in range(6, 11):
        ema.update(model, k)
    d = 1 - 11 ** (-2 / 3)  # decay(10)
    assert float(ema.module.weight[0]) == pytest.approx(4.0 * d + 1.0 * (1 - d), rel=1e-12)
    # float buffers are averaged as the parameters (ema-pytorch lerps them), counters copied
    assert float(ema.module.running_mean[0]) == pytest.approx(5.0 * d - (1 - d), rel=1e-12)
    assert int(ema.module.num_batches_tracked) == 13
    assert ema.updates == 3 and ema.last_step == 10


def test_constant_rule_copies_once_then_lerps_with_beta():
    model = _bn_model()
    ema = EMA(model, beta=0.9, update_every=5, warmup=False)
    _set(model, 2.0, 3.0, 1)
    ema.update(model, 0)
    assert float(ema.module.weight[0]) == 2.0
    _set(model, 4.0, 5.0, 2)
    for k in range(1, 6):
        ema.update(model, k)
    assert float(ema.module.weight[0]) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0, rel=1e-12)
    assert float(ema.module.running_mean[0]) == pytest.approx(0.9 * 3.0 + 0.1 * 5.0, rel=1e-12)


def _buffered_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 4))


def _train_steps(net: nn.Module, last: int):
    """SGD on random regression data in train mode (the batch norm's running statistics move at
    every step); yields ``k`` after optimizer step ``k = 0 .. last``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    target = nn.Linear(4, 4)
    for k in range(last + 1):
        x = torch.randn(32, 4, generator=gen)
        opt.zero_grad()
        (net(x) - target(x).detach()).pow(2).mean().backward()
        opt.step()
        yield k


class _ReplayedAuthorsEMA:
    """ema-pytorch 0.2.3's ``update()`` as the authors configure it, written out in float64 over
    the floating tensors of ``net`` (parameters and float buffers): a counter of calls; at a call
    whose counter is a multiple of update_every, a copy if counter <= update_after_step, else a
    copy the first time (``initted``) followed by a lerp with the decay of the incremented
    counter minus update_after_step minus 1."""

    def __init__(self, net, beta=0.9999, update_every=5, power=2 / 3, inv_gamma=1.0):
        self.beta, self.every, self.power, self.inv_gamma = beta, update_every, power, inv_gamma
        self.update_after_step, self.min_value = 0, 0.0
        self.step, self.initted = 0, False
        self.avg = {n: t.detach().double().clone() for n, t in self._floats(net).items()}

    @staticmethod
    def _floats(net):
        both = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        return {n: t for n, t in both.items() if t.is_floating_point()}

    def update(self, net):
        step = self.step
        self.step += 1
        if step % self.every != 0:
            return
        online = {n: t.detach().double() for n, t in self._floats(net).items()}
        if step <= self.update_after_step:
            self.avg = {n: t.clone() for n, t in online.items()}
            return
        if not self.initted:
            self.avg = {n: t.clone() for n, t in online.items()}
            self.initted = True
        epoch = max(self.step - self.update_after_step - 1, 0.0)
        decay = 0.0
        if epoch > 0:
            value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
            decay = min(max(value, self.min_value), self.beta)
        self.avg = {n: a + (1 - decay) * (online[n] - a) for n, a in self.avg.items()}


def _max_gap(ema: EMA, avg: dict) -> float:
    mine = {**dict(ema.module.named_parameters()), **dict(ema.module.named_buffers())}
    return max(float((mine[n].double() - a).abs().max()) for n, a in avg.items())


def test_ema_replays_the_authors_rule_for_2000_steps_on_a_network_with_float_buffers():
    """Max abs gap to the replayed rule at every update up to k = 2000 (float32 averages of weights
    and running statistics of order 1, the replay in float64): within 1e-6, a few float32 ulps
    (the lerps' rounding decays with the average). Without the re-copy the gap is about 0.05 at
    k = 5 and 1e-4 at k = 2000; a decay one step off moves it by about 1e-4 at k = 10."""
    net = _buffered_net()
    ema, replay = EMA(net), _ReplayedAuthorsEMA(net)
    gaps = {}
    for k in _train_steps(net, 2000):
        if ema.update(net, k):
            replay.update(net)
            gaps[k] = _max_gap(ema, replay.avg)
        else:
            replay.update(net)  # counts the call
    assert max(gaps.values()) <= 1e-6, {k: gaps[k] for k in (5, 100, 2000)}
    # the averages moved: the network trained and the statistics changed since the re-copy
    assert not torch.equal(ema.module[1].running_mean, net[1].running_mean)


def test_ema_equals_ema_pytorch_itself_when_installed():
    """The same comparison against the library (optional test dependency ``ema-pytorch==0.2.3``),
    both in float32: equal to float32 rounding (1e-6, as above)."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    net = _buffered_net()
    theirs = ema_pytorch.EMA(
        net, beta=0.9999, update_after_step=0, update_every=5, inv_gamma=1.0, power=2 / 3
    )
    mine = EMA(net)
    for k in _train_steps(net, 2000):
        theirs.update()
        mine.update(net, k)
        avg = {
            n: t.double() for n, t in theirs.ema_model.state_dict().items() if t.is_floating_point()
        }
        assert _max_gap(mine, avg) <= 1e-6, k


def test_plain_rule_equals_averaged_model_bitwise():
    """warmup=False, update_every=1 is torch's AveragedModel EMA (copy, then foreach lerp with
    1 - beta) bit for bit, float buffers included."""
    net = _buffered_net()
    mine = EMA(net, beta=0.9, update_every=1, warmup=False)
    ref = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for k in _train_steps(net, 12):
        mine.update(net, k)
        ref.update_parameters(net)
        a, b = mine.module.state_dict(), ref.module.state_dict()
        for n in a:
            if a[n].is_floating_point():
                assert torch.equal(a[n], b[n]), (k, n)
    assert mine.updates == int(ref.n_averaged) == 13


def test_fast_path_follows_the_model_passed_and_survives_deepcopy():
    net, other = _buffered_net(), _buffered_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    ema = EMA(net, beta=0.5, update_every=1, warmup=False)
    ema.update(net, 0)
    ema.update(other, 1)  # another model: its tensors, not the cached ones of net
    want = 0.5 * net[0].weight + 0.5 * other[0].weight
    torch.testing.assert_close(ema.module[0].weight, want, rtol=0, atol=1e-7)
    twin = __import__("copy").deepcopy(ema)
    assert twin._plan is None  # the copy holds no reference to the online tensors
    twin.update(other, 2)
    assert torch.equal(twin.module[0].weight, 0.5 * want + 0.5 * other[0].weight)
    with pytest.raises(ValueError, match="names differ"):
        ema.update(nn.Linear(4, 4), 3)


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
    assert (resumed.updates, resumed.last_step) == (3, 5)
    torch.set_rng_state(rng)
    with pytest.raises(ValueError, match="step"):
        resumed.update(net, 5)  # already done
    for k in range(6, 12):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        resumed.update(net, k)
    assert resumed.state_dict().keys() == final.keys()
    for n, v in resumed.state_dict().items():
        assert torch.equal(v, final[n]), n


@pytest.mark.parametrize(
    ("changed", "name"),
    [
        (dict(beta=0.999), "beta"),
        (dict(update_every=1), "update_every"),
        (dict(power=0.75), "power"),
        (dict(warmup=False), "warmup"),
    ],
)
def test_load_state_dict_refuses_other_settings(changed, name):
    net = _buffered_net()
    saved = EMA(net, update_every=5)
    for k in _train_steps(net, 10):
        saved.update(net, k)
    other = EMA(_buffered_net(), **{"update_every": 5, **changed})
    before = {n: v.clone() for n, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=f"EMA.load_state_dict {name}=.*this EMA has {name}="):
        other.load_state_dict(saved.state_dict())
    for n, v in other.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[n]), n


def test_reads_averaged_model_and_older_ema_states():
    net = _buffered_net()
    ref = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    steps = _train_steps(net, 4)
    for _ in range(3):
        next(steps)
        ref.update_parameters(net)
    plain = EMA(_buffered_net(), beta=0.9, update_every=1, warmup=False)
    plain.load_state_dict(ref.state_dict())
    assert (plain.updates, plain.last_step) == (3, 2)
    k = next(steps)
    plain.update(net, k)
    ref.update_parameters(net)
    assert torch.equal(plain.module[0].weight, ref.module[0].weight)
    with pytest.raises(ValueError, match="n_averaged"):
        EMA(_buffered_net()).load_state_dict(ref.state_dict())
    older = {f"module.{n}": v for n, v in ref.module.state_dict().items()}
    older["last_step"] = torch.tensor(10)
    authors = EMA(_buffered_net(), update_every=5)
    with pytest.warns(UserWarning, match="without its settings"):
        authors.load_state_dict(older)
    assert (authors.updates, authors.last_step) == (3, 10)  # updates at 0, 5, 10


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


def test_foreach_update_copies_at_weight_one_and_lerps_otherwise():
    a, b = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, float("inf")])]
    foreach_update_(a, b, 1.0)  # a copy, even of a non-finite value (a lerp would give nan)
    assert torch.equal(a[0], b[0])
    a = [torch.tensor([1.0])]
    foreach_update_(a, [torch.tensor([3.0])], 0.25)
    assert float(a[0]) == 1.5
    rule = EMARule(0.9, update_every=2, warmup=True)
    assert [rule.weight(k, n) for k, n in ((1, 0), (0, 0), (2, 1), (4, 2))] == [
        None,
        1.0,
        1.0,
        1.0 - min(0.9, 1 - 5 ** (-2 / 3)),
    ]


@pytest.mark.parametrize(
    ("gc_model", "warmup", "every"), [("ema", True, 2), ("const_ema", False, 3)]
)
def test_seed_ensemble_applies_the_same_rule(gc_model, warmup, every):
    """train_ensemble's EMA against the rule written out over the recorded online weights of
    every step (float64 replay of float32 lerps: 1e-6)."""
    spec = EnsembleSpec(
        method="gc",
        gc_model=gc_model,
        mu=0.5,
        steps=9,
        batch=16,
        hidden=16,
        depth=2,
        lr=1e-2,
        s0=2,
        s1=8,
        ema_beta=0.8,
        ema_every=every if warmup else 5,
        const_ema_every=every,
    )
    seen = []
    ens = train_ensemble(
        get_preset("two_gaussians_1to2"),
        spec,
        [0, 1],
        callback=lambda step, e: seen.append({n: p.detach().double() for n, p in e.params.items()}),
        callback_steps=range(1, spec.steps + 1),
        prefetch=False,
    )
    avg, done = None, 0
    for k, w in enumerate(seen):
        if k % every:
            continue
        if done == 0 or (warmup and done == 1):
            avg = {n: v.clone() for n, v in w.items()}
        else:
            d = min(0.8, 1 - (1 + k) ** (-2 / 3)) if warmup else 0.8
            avg = {n: d * a + (1 - d) * w[n] for n, a in avg.items()}
        done += 1
    for n, v in ens.ema.items():
        torch.testing.assert_close(v.double(), avg[n], rtol=0, atol=1e-6)
    assert not torch.equal(ens.ema["backbone.out.weight"], ens.params["backbone.out.weight"])
