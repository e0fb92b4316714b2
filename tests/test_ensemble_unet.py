"""The U-Net seed ensemble (``EnsembleSpec(backbone="unet")``, ``map_seeds``) equals training each
seed alone.

Tolerance: the ensemble runs the U-Net per seed in a loop (``seed_map="loop"``) or under
``torch.func.vmap`` (``"vmap"``: each convolution one grouped convolution over the seeds, its
weight gradient summed in another order than a seed's own convolution), and Adam as one fused
kernel over the stacked weights; the sequential run one ordinary U-Net and the multi-tensor Adam.
Measured on this test's tiny U-Net (8 steps, lr 1e-3, seeds 3 and 5): the largest weight gap was
4.3e-5 with vmap (CD; CT 2.8e-5, GC 2.6e-5, its EMA 1.1e-5) and 2.0e-5 with the loop, the largest
loss gap 2.4e-7 for both. Adam normalises each step, so a rounding difference in a gradient near
zero moves a weight by a visible fraction of ``lr``: the gaps are larger than the MLP ensemble's
(tests/test_ensemble.py). ``atol = 2e-4`` (about 5x the largest gap, a fifth of one step of
``lr = 1e-3``) on the weights, ``1e-6`` on the losses (4x the gap): two seeds' weights swapped
differ by ~0.9 and the test below shows it fails; rows mixed across the seed axis change the
outputs by O(1) (``test_rows_follow_their_seed``).
"""

import pytest
import torch

from gcflows.ensemble import (
    DIGITS_UNET,
    EnsembleSpec,
    RowsAsImages,
    SeedMap,
    make_model,
    map_seeds,
    train_ensemble,
    train_sequential,
)
from gcflows.gmm import get_preset
from gcflows.networks import UNet

WEIGHT_TOL = dict(rtol=0.0, atol=2e-4)
LOSS_TOL = dict(rtol=0.0, atol=1e-6)
# 4x4 one-channel images for the 16-D target: two levels, GroupNorm of 2 groups
TINY = dict(
    in_channels=1,
    base_channels=4,
    channel_mults=(1, 2),
    num_blocks=1,
    attn_resolutions=(),
    image_size=4,
    num_groups=2,
    dropout=0.0,
)
SEEDS = [3, 5]


def _spec(method, **kw):
    base = dict(
        method=method,
        gc_model="ema",
        mu=0.5,
        steps=8,
        batch=16,
        lr=1e-3,
        ema_every=2,
        ema_beta=0.9,
        s0=2,
        s1=8,
        backbone="unet",
        unet=TINY,
    )
    return EnsembleSpec(**{**base, **kw})


def _max_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def target():
    return get_preset("random_16")


@pytest.mark.parametrize("seed_map", ["loop", "vmap"])
@pytest.mark.parametrize("method", ["ct", "gc"])
def test_each_seed_equals_its_own_run(target, method, seed_map):
    """CT, and GC (mu = 0.5) with the warm-up EMA generator: weights, losses, EMA per seed."""
    spec = _spec(method, seed_map=seed_map)
    ens = train_ensemble(target, spec, SEEDS)
    assert set(ens.params) == set(make_model(16, spec, 0).state_dict())  # single-seed names
    refs = [train_sequential(target, spec, s) for s in SEEDS]
    for i, (model, ema, losses) in enumerate(refs):
        ref = model.state_dict()
        for k, v in ens.params.items():
            torch.testing.assert_close(v[i].detach(), ref[k], **WEIGHT_TOL)
        torch.testing.assert_close(torch.stack(ens.losses)[:, i], torch.tensor(losses), **LOSS_TOL)
        if method == "gc":
            ref_ema = ema.module.state_dict()
            for k, v in ens.ema.items():
                torch.testing.assert_close(v[i], ref_ema[k], **WEIGHT_TOL)
            # the generator is an average, not the online weights
            key = "backbone.net.conv_out.weight"
            assert not torch.allclose(ens.ema[key][i], ens.params[key][i].detach(), atol=1e-4)
    # the comparison can fail: seed 3's run against the ensemble's seed 5 (swapped weights)
    swapped = {k: v[1].detach() for k, v in ens.params.items()}
    assert _max_gap(swapped, refs[0][0].state_dict()) > 100 * WEIGHT_TOL["atol"]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(swapped, refs[0][0].state_dict(), **WEIGHT_TOL)


def test_eval_ema_seed_model_and_apply_agree(target):
    """``seed_model`` (an ordinary U-Net ConsistencyModel) and ``apply`` with the evaluation EMA
    give the same outputs per seed; the evaluation EMA equals the sequential run's (CD: the
    positive control's exact-velocity target through the U-Net)."""
    spec = _spec("cd", steps=5, eval_ema=0.99, seed_map="vmap")
    ens = train_ensemble(target, spec, SEEDS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g) * 3
    t = torch.rand(2, 7, generator=g) * 10 + 0.01
    out = ens.apply(x, t, ens.eval_ema)
    for i, s in enumerate(SEEDS):
        model = ens.seed_model(i, use_eval_ema=True)
        assert isinstance(model.backbone, RowsAsImages)
        torch.testing.assert_close(out[i], model(x[i], t[i]).detach(), rtol=1e-5, atol=1e-5)
        ref, _, _ = train_sequential(target, spec, s)
        ref_ema = ref.eval_ema.module.state_dict()
        for k, v in ens.eval_ema.items():
            torch.testing.assert_close(v[i], ref_ema[k], **WEIGHT_TOL)


@pytest.mark.parametrize("mode", SeedMap.MODES)
def test_rows_follow_their_seed(mode):
    """``SeedMap`` maps seed ``s``'s block of rows through seed ``s``'s network; feeding the rows
    interleaved (the seed axis misaligned) is far off."""
    nets = []
    for s in range(3):
        torch.manual_seed(s)
        nets.append(RowsAsImages(UNet(**TINY), (1, 4, 4)))
    both = SeedMap(nets, mode)
    assert dict(both.named_parameters()).keys() == dict(nets[0].named_parameters()).keys()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(3 * 5, 16, generator=g), torch.randn(3 * 5, generator=g)
    y = both(x, c)
    for s in range(3):
        rows = slice(5 * s, 5 * (s + 1))
        torch.testing.assert_close(y[rows], nets[s](x[rows], c[rows]), rtol=1e-5, atol=1e-5)
    # the same rows read seed-minor (row j of seed s at j * 3 + s) give other outputs
    mixed = x.reshape(5, 3, 16).transpose(0, 1).reshape(15, 16)
    assert float((both(mixed, c) - y).detach().abs().max()) > 1e-2
    with pytest.raises(ValueError, match="seed-major"):
        both(x[:14], c[:14])
    with pytest.raises(ValueError, match="dropout"):
        SeedMap([RowsAsImages(UNet(**{**TINY, "dropout": 0.1}), (1, 4, 4))])
    with pytest.raises(ValueError, match="ConsistencyModel"):
        map_seeds(nets)
    with pytest.raises(ValueError, match="mode="):
        SeedMap(nets, "grouped")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backbone", "cnn", "EnsembleSpec.backbone="),
        ("seed_map", "grouped", "EnsembleSpec.seed_map="),
        ("unet", {**TINY, "dropout": 0.1}, r"EnsembleSpec.unet\['dropout'\]="),
        ("unet", {**TINY, "colour": 3}, "EnsembleSpec.unet="),
        ("unet", {**TINY, "image_size": 3}, "EnsembleSpec.unet="),  # 2 levels need an even size
        ("unet", {**TINY, "image_size": 8}, "EnsembleSpec.unet image shape="),  # 64 != 16
    ],
)
def test_bad_specs_are_refused(target, field, value, message):
    spec = _spec("ct", **{field: value})
    with pytest.raises(ValueError, match=message):
        train_ensemble(target, spec, [0])
    with pytest.raises(ValueError, match=message):
        train_sequential(target, spec, 0)


def test_unet_settings_need_the_unet_backbone_and_default_to_digits():
    with pytest.raises(ValueError, match="EnsembleSpec.unet="):
        EnsembleSpec(unet=TINY).validate()  # backbone "mlp"
    spec = EnsembleSpec(backbone="unet").validate(64)
    assert spec.image_shape() == (1, 8, 8) and spec.unet_config() == DIGITS_UNET
    model = make_model(64, spec, 0)
    assert model.backbone.net.config["base_channels"] == DIGITS_UNET["base_channels"]
