"""Tests of gcflows.training: config validation, exact resume, atomic checkpoints, NaN stop, the run
record, the EMA, and a toy CT run that learns both modes of two_gaussians_1to2.

Models are tiny ToyMLPs so that every run takes well under a second (except the learning test).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import toy_config, toy_model
from lion_pytorch import Lion
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gcflows import training
from gcflows.consistency import ConsistencyModel, ConsistencyObjective
from gcflows.couplings import ot_coupling
from gcflows.gmm import GaussianMixture, two_gaussians_1to2
from gcflows.metrics import exact_w2, mode_coverage
from gcflows.networks import ToyMLP
from gcflows.processes import VEProcess
from gcflows.sampling import one_step_sample
from gcflows.training import (
    NonFiniteLossError,
    TrainConfig,
    build_optimizer,
    config_fingerprint,
    distributed_ot_coupling,
    load_checkpoint,
    load_payload,
    load_weights,
    save_checkpoint,
    train,
)
from gcflows.velocity import MonteCarloVelocity, TrueVelocity

GMM = two_gaussians_1to2(dtype=torch.float32)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_optimizer_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            va, vb = sa[k][name], sb[k][name]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (k, name)


def read_metrics(run: Path, drop=("time",)) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_process_defaults():
    cfg = TrainConfig(
        method="gc",
        mu=0.3,
        betas=(0.9, 0.99),
        data_shape=(1, 8, 8),
        model={"preset": "digits", "channel_mults": [1, 2]},
        optimizer="lion",
    )
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert (cfg.t_min, cfg.t_max) == (0.002, 80.0)  # ve default
    lin = TrainConfig(process="linear")
    assert (lin.t_min, lin.t_max) == (1e-3, 0.999)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr_decay": 0.5})


BAD_FIELDS = [
    ("mu", -0.1),
    ("mu", 1.5),
    ("mu", float("nan")),
    ("s0", 20),  # with s1 = 10 below
    ("t_min", 5.0),  # with t_max = 5.0 below
    ("t_min", 6.0),
    ("t_max", 1.0),  # linear process needs t_max < 1
    ("batch_size", 0),
    ("batch_size", 2.5),
    ("total_steps", 0),
    ("lr", 0.0),
    ("lr", float("inf")),
    ("optimizer", "sgd"),
    ("distance", "l1"),
    ("method", "dsm"),
    ("process", "vp"),
    ("ema_decay", 1.0),
    ("betas", (0.9,)),
    ("dropout", 1.0),
    ("cd_step", "rk4"),
    ("device", "tpu"),
    ("data_shape", (0, 2)),
    ("data_sampling", "stratified"),
    ("seed", -1),
    ("log_every", 0),
    ("checkpoint_every", -1),
    ("warmup_steps", -2),
    ("model", {"act": object()}),
]


@pytest.mark.parametrize("name,value", BAD_FIELDS, ids=[f"{n}={v!r}" for n, v in BAD_FIELDS])
def test_bad_config_raises_before_any_file(tmp_path, name, value):
    extra = {}
    if name == "s0":
        extra = {"s1": 10}
    elif name == "t_min":
        extra = {"t_max": 5.0}
    elif name == "t_max":
        extra = {"process": "linear"}
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name}="):
        TrainConfig(out_dir=str(run), **extra, **{name: value})
    assert not run.exists()


def _cd_without_velocity(tmp):
    return toy_config(tmp, method="cd"), toy_model(), GMM.sample, {}


def _velocity_with_ct(tmp):
    return toy_config(tmp), toy_model(), GMM.sample, {"velocity": lambda x, t, **kw: x}


def _shape_mismatch(tmp):
    return toy_config(tmp, data_shape=(3,)), toy_model(), GMM.sample, {}


def _process_mismatch(tmp):
    return toy_config(tmp), toy_model(t_max=5.0), GMM.sample, {}


def _bad_sampler(tmp):
    return toy_config(tmp), toy_model(), lambda n, g: torch.zeros(n), {}


def _nan_tensor(tmp):
    data = GMM.sample(64, generator=torch.Generator().manual_seed(0))
    data[3, 0] = float("nan")
    return toy_config(tmp), toy_model(), data, {}


def _batch_above_rows(tmp):
    return toy_config(tmp, batch_size=32), toy_model(), torch.zeros(8, 2), {}


def _gen_model_with_ct(tmp):
    return toy_config(tmp), toy_model(), GMM.sample, {"gc_model": toy_model()}


def _cuda_missing(tmp):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return toy_config(tmp, device="cuda"), toy_model(), GMM.sample, {}


@pytest.mark.parametrize(
    "case",
    [
        _cd_without_velocity,
        _velocity_with_ct,
        _shape_mismatch,
        _process_mismatch,
        _bad_sampler,
        _nan_tensor,
        _batch_above_rows,
        _gen_model_with_ct,
        _cuda_missing,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_train_arguments_raise_before_any_file(tmp_path, case):
    run = tmp_path / "run"
    cfg, model, data, kw = case(run)
    with pytest.raises(ValueError):
        train(cfg, model, data, **kw)
    assert not run.exists()


def test_optimizers_follow_the_config():
    params = list(toy_model().parameters())
    adam = build_optimizer(TrainConfig(optimizer="adam", lr=3e-4, betas=(0.8, 0.9)), params)
    radam = build_optimizer(TrainConfig(optimizer="radam", lr=2e-4, weight_decay=0.1), params)
    lion = build_optimizer(TrainConfig(optimizer="lion", lr=1e-4), params)
    assert type(adam) is torch.optim.Adam and type(radam) is torch.optim.RAdam
    assert isinstance(lion, Lion)
    assert adam.param_groups[0]["betas"] == (0.8, 0.9) and adam.param_groups[0]["lr"] == 3e-4
    assert radam.param_groups[0]["weight_decay"] == 0.1
    assert lion.param_groups[0]["lr"] == 1e-4


# ------------------------------------------------------------------------------------------------
# exact resume
# ------------------------------------------------------------------------------------------------
RESUME_CASES = [
    # method, optimizer, data source, dropout, warm-up, extra config
    ("ct", "adam", "tensor", 0.2, 0, {}),
    ("ot", "lion", "sampler", 0.0, 5, {}),
    ("gc", "radam", "sampler", 0.1, 0, {}),
    # the authors' warm-up EMA as GC model, averaged every 5 steps (gcflows.ema)
    ("gc", "adam", "sampler", 0.0, 0, {"ema_warmup": True, "ema_every": 5}),
    # continuous time (gcflows.continuous), with both sCM stabilizers
    ("gc", "adam", "sampler", 0.1, 0, {"continuous": True, "tangent_warmup": 4}),
    ("ot", "radam", "tensor", 0.0, 0, {"continuous": True, "tangent_norm": None}),
]


@pytest.mark.parametrize("method,opt,source,dropout,warmup,extra", RESUME_CASES)
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(
    tmp_path, method, opt, source, dropout, warmup, extra
):
    data = (
        GMM.sample(100, generator=torch.Generator().manual_seed(3)) if source == "tensor" else None
    )
    src = data if data is not None else GMM.sample
    kw = dict(method=method, optimizer=opt, warmup_steps=warmup, ema_decay=0.9, seed=5, **extra)
    full = train(toy_config(tmp_path / "full", **kw), toy_model(dropout=dropout), src)
    assert full.step == 12

    cfg = toy_config(tmp_path / "split", **kw)
    half = train(cfg, toy_model(dropout=dropout), src, stop_after=6)
    assert half.step == 6 and load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 6
    # the resumed run starts from another initialisation: everything must come from the checkpoint
    rest = train(cfg, toy_model(dropout=dropout, seed=99), src)
    assert rest.step == 12

    assert_state_equal(full.model.state_dict(), rest.model.state_dict())
    assert_state_equal(full.ema.state_dict(), rest.ema.state_dict())
    assert_optimizer_equal(full.optimizer, rest.optimizer)
    # the metrics file holds each logged step once, with the same values
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "split")
    # and the second half really trained: the half-way weights differ from the final ones
    assert not torch.equal(next(half.model.parameters()), next(rest.model.parameters()))


def test_train_leaves_the_callers_rng_and_model_checks_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = toy_model(dropout=0.2)
    seen = []
    res = train(
        toy_config(None, total_steps=3),
        model,
        GMM.sample,
        callbacks=[lambda info: seen.append(info.model.check_inputs)],
    )
    assert seen == [True, True, True]  # callbacks see the models with their checks on
    assert torch.equal(torch.rand(3), expected)
    # the time-domain checks switched off inside the loop are back on
    assert model.check_inputs and res.ema_model.check_inputs
    with pytest.raises(ValueError, match="t must lie in"):
        model(torch.zeros(2, 2), 100.0)


# ------------------------------------------------------------------------------------------------
# atomic checkpoints, corrupt / foreign checkpoints
# ------------------------------------------------------------------------------------------------
def _crashing_save(real_save, after_calls: int):
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            f.write(b"PK\x03\x04 partial checkpoint bytes")  # a torn write
            raise OSError("simulated crash while writing the checkpoint")
        return real_save(obj, f, *args, **kwargs)

    return save


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.arange(5.0)})
    monkeypatch.setattr(torch, "save", _crashing_save(torch.save, after_calls=0))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"w": torch.zeros(5)})
    monkeypatch.undo()
    assert torch.equal(load_payload(path)["w"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left over


def test_crash_during_a_run_checkpoint_keeps_the_previous_one_and_resume_is_exact(
    tmp_path, monkeypatch
):
    full = train(toy_config(tmp_path / "full"), toy_model(), GMM.sample)
    cfg = toy_config(tmp_path / "crash")
    # the first checkpoint (step 4) is written, the second (step 8) crashes mid-write
    monkeypatch.setattr(torch, "save", _crashing_save(torch.save, after_calls=1))
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg, toy_model(), GMM.sample)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["step"] == 4
    assert not list((tmp_path / "crash").glob("*.tmp"))
    with open(tmp_path / "crash" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a line torn by the crash: dropped on resume
    rest = train(cfg, toy_model(seed=7), GMM.sample)
    assert_state_equal(full.model.state_dict(), rest.model.state_dict())
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "crash")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "empty"])
def test_corrupt_checkpoint_raises_value_error_before_training(tmp_path, damage):
    run = tmp_path / "run"
    train(toy_config(run, total_steps=4), toy_model(), GMM.sample)
    ckpt = run / "checkpoint.pt"
    raw = ckpt.read_bytes()
    if damage == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "truncated":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
    else:
        ckpt.write_bytes(b"")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError, match="corrupt|not a gcflows"):
        train(toy_config(run, total_steps=8), toy_model(), GMM.sample)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cfg={"preset": "other"}), "preset"),
        (dict(cfg={"method": "gc"}), "method"),
        (dict(hidden=24), "parameter"),
        (dict(dim=3), "data_shape"),
    ],
    ids=["preset", "method", "width", "data-shape"],
)
def test_checkpoint_from_another_config_raises(tmp_path, change, match):
    run = tmp_path / "run"
    train(toy_config(run, total_steps=4, preset="toy"), toy_model(), GMM.sample)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    cfg = toy_config(run, total_steps=8, **{"preset": "toy", **change.get("cfg", {})})
    dim = change.get("dim", 2)
    model = ConsistencyModel(
        ToyMLP(dim, hidden=change.get("hidden", 16), depth=2, time_embed_dim=16), VEProcess()
    )
    data = (lambda n, g: torch.randn(n, 3, generator=g)) if dim == 3 else GMM.sample
    with pytest.raises(ValueError, match=f"different configuration.*{match}"):
        train(cfg, model, data)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_none_refuses_to_overwrite_a_run(tmp_path):
    run = tmp_path / "run"
    train(toy_config(run, total_steps=4), toy_model(), GMM.sample)
    with pytest.raises(
        ValueError, match="TrainConfig.out_dir=.* is invalid: it already holds a run"
    ):
        train(toy_config(run, total_steps=4), toy_model(), GMM.sample, resume=None)
    with pytest.raises(ValueError, match="resume=.* is invalid: no such checkpoint file"):
        train(toy_config(None), toy_model(), GMM.sample, resume=str(tmp_path / "nope.pt"))


def test_fingerprint_ignores_run_fields_but_not_model_fields():
    model = toy_model()
    a = config_fingerprint(TrainConfig(), (2,), model)
    assert config_fingerprint(TrainConfig(lr=0.5, log_every=3), (2,), model) == a
    assert config_fingerprint(TrainConfig(preset="x"), (2,), model) != a
    assert config_fingerprint(TrainConfig(), (3,), model) != a
    assert config_fingerprint(TrainConfig(), (2,), toy_model(hidden=8)) != a


# ------------------------------------------------------------------------------------------------
# NaN stop
# ------------------------------------------------------------------------------------------------
class PoisonedSampler:
    """Samples of GMM, poisoned with ``value`` from the ``bad_call``-th training batch on."""

    def __init__(self, bad_call: int, value: float, batch: int):
        self.calls, self.bad_call, self.value, self.batch = 0, bad_call, value, batch

    def __call__(self, n, generator):
        x = GMM.sample(n, generator=generator)
        if n == self.batch:  # not the shape probe
            self.calls += 1
            if self.calls >= self.bad_call:
                x = torch.full_like(x, self.value)
        return x


@pytest.mark.parametrize(
    "value,what", [(float("nan"), "data batch"), (1e30, "non-finite loss")], ids=["nan", "inf"]
)
def test_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, value, what):
    clean = train(
        toy_config(tmp_path / "clean", total_steps=12), toy_model(), GMM.sample, stop_after=4
    )
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=f"step 7: .*{what}") as info:
        train(toy_config(run), toy_model(), PoisonedSampler(7, value, batch=16))
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.step == 7 and err.last_good_step == 4
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 4
    assert_state_equal(ckpt["model"], clean.model.state_dict())
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run))
    assert max(m["step"] for m in read_metrics(run)) == 6


# ------------------------------------------------------------------------------------------------
# run record, EMA, samples, GC generator
# ------------------------------------------------------------------------------------------------
def test_run_folder_holds_config_metrics_checkpoint_and_samples(tmp_path):
    run = tmp_path / "run"
    cfg = toy_config(run, total_steps=8, sample_every=4, sample_count=5, method="gc", mu=1.0)
    res = train(cfg, toy_model(), GMM.sample)
    rec = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(rec["config"]) == cfg
    assert rec["seed"] == cfg.seed and rec["world_size"] == 1 and rec["device"] == "cpu"
    assert set(rec["versions"]) == {"python", "torch", "numpy", "gcflows"}
    assert rec["hostname"] and rec["data_shape"] == [2]
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(training.__file__).parent,
        capture_output=True,
        text=True,
    )
    if git.returncode == 0:
        assert rec["git_sha"] == git.stdout.strip()
    metrics = read_metrics(run, drop=())
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    obj = ConsistencyObjective("ve", "ct", s0=2, s1=16, total_steps=8)
    for m in metrics:
        assert set(m) == {"step", "loss", "lr", "N", "pair_cost", "gc_fraction", "time"}
        assert m["N"] == obj.num_intervals(m["step"] - 1)
        assert m["gc_fraction"] == 1.0  # mu = 1: every row generator-induced
        assert m["lr"] == cfg.lr and m["pair_cost"] > 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_00000004.pt",
        "step_00000008.pt",
    ]
    last = torch.load(run / "samples" / "step_00000008.pt", weights_only=True)
    noise = torch.randn(
        5, 2, generator=torch.Generator().manual_seed(training.derive_seed(cfg.seed, 0, 4))
    )
    with torch.no_grad():
        expected = one_step_sample(res.ema_model, noise, VEProcess())
    assert torch.equal(last["samples"], expected)


def test_ema_is_the_decay_recurrence_of_the_online_weights():
    decay = 0.8
    seen: list[dict] = []

    def record(info):
        seen.append({k: v.detach().clone() for k, v in info.model.state_dict().items()})

    res = train(
        toy_config(None, ema_decay=decay, total_steps=5),
        toy_model(),
        GMM.sample,
        callbacks=[record],
    )
    ema = dict(seen[0])  # the first update copies the weights
    for w in seen[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
    for k, v in res.ema_model.state_dict().items():
        # float32 recurrence evaluated in another order than torch._foreach_lerp_: a few ulps
        torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)
    assert res.ema.updates == 5


def test_ema_fast_path_equals_averaged_model_bitwise():
    """update_ema's plain EMA (gcflows.ema.EMA's cached foreach lerp) is torch's
    AveragedModel.update_parameters with get_ema_multi_avg_fn: the same averages bit for bit,
    the same number of updates."""
    model, decay = toy_model(hidden=8), 0.9
    fast = training.make_ema(model, decay)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        training.update_ema(fast, model, step)
        reference.update_parameters(model)
        mine, theirs = fast.module.state_dict(), reference.module.state_dict()
        assert mine.keys() == theirs.keys()
        for a, b in zip(mine.values(), theirs.values(), strict=True):
            assert torch.equal(a, b)
    assert fast.updates == reference.n_averaged.item() == 5


@pytest.mark.parametrize("name", ["adam", "radam"])
def test_foreach_optimizer_steps_equal_the_per_tensor_loop(name):
    """build_optimizer asks for the multi-tensor (foreach) update on every device; on the CPU it
    gives the per-tensor loop's weights (the default there) after several steps. Bitwise on the
    AMD instances this was written on; on an Intel (AVX-512) instance RAdam's foreach kernels
    round a few values differently, by at most a few float32 ulp of weights of order 0.1 over 4
    steps, hence rtol 1e-6 / atol 1e-7 (a wrong update moves weights by ~lr = 1e-2)."""
    models = [toy_model(hidden=8), toy_model(hidden=8)]
    cfg = TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.01)
    built = build_optimizer(cfg, models[0].parameters())
    assert built.param_groups[0]["foreach"] is True
    loop = type(built)(models[1].parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(32, 2, generator=gen)
        t = torch.rand(32, generator=gen) + 0.1
        for model, opt in zip(models, (built, loop), strict=True):
            opt.zero_grad()
            model(x, t).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_warmup_ema_follows_the_authors_decay_every_k_steps():
    """``ema_warmup=True, ema_every=3``: the average is updated after the optimiser steps with
    0-based index k = 0, 3, 6, ...: the first two updates copy the network (ema-pytorch 0.2.3's
    copy branch and its re-copy), the later ones lerp with decay ``min(beta, 1 - (1 + k)^(-2/3))``
    (docs/paper.md section 5.3)."""
    beta, every = 0.95, 3
    seen: list[dict] = []

    def record(info):
        seen.append({k: v.detach().clone() for k, v in info.model.state_dict().items()})

    cfg = toy_config(None, ema_decay=beta, ema_warmup=True, ema_every=every, total_steps=8)
    res = train(cfg, toy_model(), GMM.sample, callbacks=[record])
    ema, done = None, 0
    for k, w in enumerate(seen):
        if k % every:
            continue
        d = min(beta, 1.0 - (1.0 + k) ** (-2.0 / 3.0))
        ema = dict(w) if done < 2 else {n: d * ema[n] + (1 - d) * w[n] for n in ema}
        done += 1
    assert ema is not None and len(seen) == 8 and done == 3
    for n, v in res.ema_model.named_parameters():
        torch.testing.assert_close(v, ema[n], rtol=1e-6, atol=1e-7)  # a few float32 ulps
    assert int(res.ema.last_step) == 7


@pytest.mark.parametrize("method", ["ct", "cd", "ot", "gc"])
def test_continuous_time_trains_every_method_through_the_loop(method):
    kw = {"velocity": TrueVelocity(GMM, VEProcess(0.002, 80.0))} if method == "cd" else {}
    cfg = toy_config(None, method=method, continuous=True, total_steps=6, distance="squared_l2")
    res = train(cfg, toy_model(), GMM.sample, **kw)
    assert res.step == 6
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    before = toy_model().state_dict()
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())


@pytest.mark.parametrize(("mu", "tol"), [(1.0, 0.0), (0.3, 0.06)])
def test_continuous_gc_run_follows_mu(mu, tol):
    """A continuous-time GC run draws generator-induced rows with probability config.mu: all of
    them at mu = 1, about 30 % at mu = 0.3 (4 steps x 256 rows: sd 0.014, tolerance 4 sd).
    The objective's own default (0.5) would show as 0.5 in both."""
    cfg = toy_config(
        None,
        method="gc",
        continuous=True,
        mu=mu,
        distance="squared_l2",
        batch_size=256,
        total_steps=4,
        log_every=1,
    )
    res = train(cfg, toy_model(), GMM.sample)
    fractions = [m["gc_fraction"] for m in res.history]
    assert len(fractions) == 4
    if tol == 0.0:
        assert fractions == [1.0] * 4
    else:
        assert abs(sum(fractions) / 4 - mu) < tol, fractions


def test_lr_at_warms_up_linearly_from_the_first_step():
    """Step k (0-based) trains at lr (k + 1) / warmup_steps up to lr: the first step is not at 0.
    Written out for warmup_steps = 4, and seen in the metrics of a run (the record of step 1 is
    the lr of k = 0)."""
    lr_at = training.step.lr_at
    cfg = toy_config(None, lr=2e-3, warmup_steps=4)
    want = [0.5e-3, 1.0e-3, 1.5e-3, 2.0e-3, 2.0e-3, 2.0e-3]
    assert [lr_at(cfg, k) for k in range(6)] == pytest.approx(want, rel=1e-12)
    assert [lr_at(cfg.replace(warmup_steps=1), k) for k in range(3)] == [2e-3] * 3
    assert [lr_at(cfg.replace(warmup_steps=0), k) for k in range(3)] == [2e-3] * 3
    res = train(cfg.replace(total_steps=5, log_every=1), toy_model(), GMM.sample)
    assert [m["lr"] for m in res.history] == pytest.approx(want[:5], rel=1e-12)
    before = toy_model().state_dict()
    first = train(cfg.replace(total_steps=1, log_every=1), toy_model(), GMM.sample)
    assert any(not torch.equal(before[k], v) for k, v in first.model.state_dict().items())


def test_continuous_config_needs_a_quadratic_distance_and_valid_stabilizers():
    with pytest.raises(ValueError, match="TrainConfig.distance='l2_norm'.*alpha = 2"):
        TrainConfig(continuous=True, distance="l2_norm")
    with pytest.raises(ValueError, match="TrainConfig.tangent_norm=0.0"):
        TrainConfig(continuous=True, tangent_norm=0.0)
    with pytest.raises(ValueError, match="TrainConfig.ema_every=0"):
        TrainConfig(ema_every=0)
    with pytest.raises(ValueError, match="TrainConfig.continuous='yes'"):
        TrainConfig(continuous="yes")


def test_gc_uses_the_frozen_generator_when_given():
    far = GaussianMixture([1.0], torch.tensor([[10.0, 10.0]]), stds=0.1, dtype=torch.float32)

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    cfg = toy_config(None, method="gc", mu=1.0, batch_size=256, total_steps=2, log_every=1)
    res = train(cfg, toy_model(), far.sample, gc_model=Zero())
    # pairs (0, noise): E||noise||^2 = 2 (sd of a 256-mean: 0.125), against ~ 202 for the data
    assert all(abs(m["pair_cost"] - 2.0) < 0.75 for m in res.history)
    res = train(cfg.replace(mu=0.0), toy_model(), far.sample, gc_model=Zero())
    assert all(m["pair_cost"] > 150 for m in res.history)


def test_cd_follows_the_given_velocity():
    # CD with the one-sample (Monte Carlo) velocity takes the Euler step x_hi + (t_lo - t_hi) xdot,
    # which is CT's x_lo up to rounding: the runs agree to float32 rounding amplified over 12
    # steps. With the exact GMM velocity the teacher points, hence the weights, differ.
    process = VEProcess()
    ct = train(toy_config(None), toy_model(), GMM.sample)
    mc = train(
        toy_config(None, method="cd"), toy_model(), GMM.sample, velocity=MonteCarloVelocity(process)
    )
    exact = train(
        toy_config(None, method="cd", cd_step="heun"),
        toy_model(),
        GMM.sample,
        velocity=TrueVelocity(GMM, process),
    )
    for k, v in ct.model.state_dict().items():
        torch.testing.assert_close(mc.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    gap = max(
        float((exact.model.state_dict()[k] - v).abs().max())
        for k, v in ct.model.state_dict().items()
    )
    assert gap > 1e-3


def test_load_weights_restores_the_ema_model(tmp_path):
    res = train(toy_config(tmp_path / "run", total_steps=4), toy_model(), GMM.sample)
    fresh = load_weights(toy_model(seed=3), tmp_path / "run" / "checkpoint.pt", which="ema")
    assert_state_equal(fresh.state_dict(), res.ema_model.state_dict())
    online = load_weights(toy_model(seed=3), tmp_path / "run" / "checkpoint.pt", which="model")
    assert_state_equal(online.state_dict(), res.model.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(toy_model(hidden=8), tmp_path / "run" / "checkpoint.pt")


def test_distributed_ot_coupling_without_a_process_group_is_ot_coupling():
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    a, b = distributed_ot_coupling(data, noise), ot_coupling(data, noise)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.permutation, b.permutation)
    assert a.cost_after == b.cost_after


# ------------------------------------------------------------------------------------------------
# learning
# ------------------------------------------------------------------------------------------------
def test_toy_ct_learns_both_modes_of_two_gaussians():
    """CT (pseudo-Huber, sigma in [0.002, 5], curriculum 10 -> 100 as in the authors' 2D notebook
    apart from lr and length) for 1000 steps of batch 256; one-step samples of the EMA model."""
    process = VEProcess(0.002, 5.0)
    cfg = TrainConfig(
        method="ct",
        t_min=0.002,
        t_max=5.0,
        s0=10,
        s1=100,
        total_steps=1000,
        batch_size=256,
        lr=2e-3,
        ema_decay=0.99,
        log_every=100,
        progress=False,
        seed=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConsistencyModel(ToyMLP(2, hidden=128, depth=3), process)
    g = torch.Generator().manual_seed(1)
    noise, target = torch.randn(1000, 2, generator=g), GMM.sample(1000, generator=g)
    with torch.no_grad():
        w2_before = exact_w2(one_step_sample(model, noise, process), target)
    res = train(cfg, model, GMM.sample)
    with torch.no_grad():
        samples = one_step_sample(res.ema_model, noise, process)
    w2 = exact_w2(samples, target)
    cover = mode_coverage(samples, torch.tensor([[0.0, -0.5], [0.0, 0.5]]), radius=0.25)
    # A model that puts all mass on one mode has W2 >= sqrt(0.5) = 0.71 (half the mass moves 1.0);
    # one blob at the mean has W2 = 0.5. Runs of this test with seeds 0-3 reached W2 = 0.08-0.10
    # and 4 % outliers; the bounds leave a factor 2 (W2) and 4 (outliers) of margin.
    assert w2 < 0.2 < w2_before, (w2, w2_before)
    # both modes hold 30-70 % of the samples (equal weights; n = 1000, so sampling noise is 1.6 %)
    assert all(0.3 < f < 0.7 for f in cover["fractions"]), cover
    assert cover["outlier_fraction"] < 0.15, cover


# ------------------------------------------------------------------------------------------------
# the one EMA in training; models without input checks in the step, never toggled
# ------------------------------------------------------------------------------------------------
def test_training_steps_call_no_time_check_and_never_switch_the_models_checks(monkeypatch):
    """The step calls the online and the EMA network through views without the per-call time
    check (training.without_input_checks), so a GC run makes no check_time call once set up,
    while callbacks and callers see the models as built, checks on, and a bad time is refused."""
    calls, per_step, flags = [0], [], []
    real = VEProcess.check_time

    def counting(self, t, name="t"):
        calls[0] += isinstance(sys._getframe(1).f_locals.get("self"), ConsistencyModel)
        return real(self, t, name)

    monkeypatch.setattr(VEProcess, "check_time", counting)
    model = toy_model()

    def record(info):
        per_step.append(calls[0])
        flags.append((info.model.check_inputs, info.ema_model.check_inputs))

    cfg = toy_config(None, method="gc", mu=1.0, total_steps=4)
    res = train(cfg, model, GMM.sample, callbacks=[record])
    assert len(set(per_step)) == 1, per_step  # no check between the callbacks of steps 1..4
    assert flags == [(True, True)] * 4 and model.check_inputs and res.ema_model.check_inputs
    for net in (model, res.ema_model):
        with pytest.raises(ValueError, match="t must lie in"):
            net(torch.zeros(2, 2), 100.0)


def test_without_input_checks_shares_the_weights_and_leaves_the_model_alone():
    model = toy_model()
    view = training.without_input_checks(model)
    assert view is not model and view.check_inputs is False and model.check_inputs is True
    assert all(a is b for a, b in zip(view.parameters(), model.parameters(), strict=True))
    x, t = torch.randn(3, 2), torch.full((3,), 1.0)
    assert torch.equal(view(x, t), model(x, t))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an optimiser step on the model moves the view
    assert torch.equal(view(x, t), model(x, t))
    plain = torch.nn.Linear(2, 2)
    assert training.without_input_checks(plain) is plain


def test_ema_state_round_trips_and_a_resume_with_another_ema_decay_is_refused(tmp_path):
    cfg = toy_config(tmp_path / "run", ema_warmup=True, ema_every=2, ema_decay=0.9, total_steps=5)
    res = train(cfg, toy_model(), GMM.sample, stop_after=5)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    again = training.make_ema(toy_model(), 0.9, warmup=True, every=2)
    again.load_state_dict(ckpt["ema"])
    assert_state_equal(again.state_dict(), res.ema.state_dict())
    assert (again.updates, again.last_step) == (3, 4)  # updates at k = 0, 2, 4
    other = dataclasses.replace(cfg, ema_decay=0.99, total_steps=6)
    with pytest.warns(UserWarning, match="changed fields"):
        with pytest.raises(ValueError, match="EMA.load_state_dict beta=0.9 .*beta=0.99"):
            train(other, toy_model(), GMM.sample)
