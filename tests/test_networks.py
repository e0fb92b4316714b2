"""networks.py: positional embedding, ToyMLP and the U-Net (digits and CIFAR-10 presets).

Properties checked: the embedding's closed form; per-sample independence of every network
(GroupNorm and attention act within a sample); a global receptive field through the skip
connections and attention; every parameter reached by the gradient; attention exactly at the
requested resolutions; dropout active in train mode only; bad configurations rejected.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gcflows.networks import (
    UNET_PRESETS,
    SinusoidalEmbedding,
    ToyMLP,
    UNet,
    _AttnBlock,
    build_unet,
    count_parameters,
    sinusoidal_embedding,
)

F64 = torch.float64


def test_sinusoidal_embedding_closed_form():
    c = torch.tensor([0.0, -0.7, 1.3])
    emb = sinusoidal_embedding(c, 8, scale=1000.0, max_period=10000.0)
    for i, ci in enumerate(c.tolist()):
        for k in range(4):
            w = 10000.0 ** (-k / 4)
            assert float(emb[i, k]) == pytest.approx(math.cos(1000 * ci * w), abs=2e-4)
            assert float(emb[i, 4 + k]) == pytest.approx(math.sin(1000 * ci * w), abs=2e-4)
    # float32 arguments up to 1300 rad: absolute error ~ 1300 * 6e-8 = 8e-5, hence abs 2e-4.
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.equal(SinusoidalEmbedding(8)(c), emb)  # the module form used by the networks
    # float64 input is embedded in float64: the formula to 1e-9 (arguments up to 1300 rad).
    emb64 = sinusoidal_embedding(c.double(), 8)
    ref = [
        [math.cos(1000 * ci * 10000.0 ** (-k / 4)) for k in range(4)]
        + [math.sin(1000 * ci * 10000.0 ** (-k / 4)) for k in range(4)]
        for ci in c.double().tolist()
    ]
    torch.testing.assert_close(emb64, torch.tensor(ref, dtype=F64), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="dim=7 is invalid: use an even integer"):
        sinusoidal_embedding(c, 7)


def _per_sample_check(net, x, c, atol):
    full = net(x, c)
    for i in range(x.shape[0]):
        torch.testing.assert_close(
            net(x[i : i + 1], c[i : i + 1]), full[i : i + 1], rtol=0, atol=atol
        )
    return full


def test_toy_mlp_defaults_and_per_sample_independence(gen):
    net = ToyMLP(2).double().eval()
    assert net.hidden == 256 and net.inp.out_features == 256  # the authors' notebook width
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    c = torch.randn(5, generator=gen, dtype=F64)
    # float64: batched and single-row matmuls may differ by rounding only (atol 1e-12).
    out = _per_sample_check(net, x, c, atol=1e-12)
    assert out.shape == (5, 2)
    # The output depends on the noise level through the embedding.
    assert not torch.allclose(net(x, c + 0.01), out)


def test_toy_mlp_dropout_only_in_train_mode(gen):
    net = ToyMLP(3, hidden=64, dropout=0.5).double()
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    c = torch.zeros(8, dtype=F64)
    net.eval()
    assert torch.equal(net(x, c), net(x, c))
    net.train()
    assert not torch.equal(net(x, c), net(x, c))


def test_toy_mlp_rejects_bad_input():
    net = ToyMLP(2)
    with pytest.raises(ValueError, match=r"ToyMLP.x.shape=\(4, 3\) is invalid: use shape \(B, 2\)"):
        net(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="c_noise must have shape"):
        net(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="hidden"):
        ToyMLP(2, hidden=0)
    with pytest.raises(ValueError, match="dropout"):
        ToyMLP(2, dropout=1.0)


def _digits(**kw):
    torch.manual_seed(0)  # parameter init only; the test inputs use their own generator
    return build_unet("digits", **kw).double()


def test_unet_digits_forward_is_per_sample(gen):
    net = _digits().eval()
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=F64)
    c = torch.randn(3, generator=gen, dtype=F64)
    out = _per_sample_check(net, x, c, atol=1e-10)  # float64 rounding of batched convolutions
    assert out.shape == (3, 1, 8, 8)
    assert not torch.allclose(net(x, c + 0.05), out)


def test_unet_receptive_field_is_global_and_every_parameter_is_used(gen):
    # The gradient of one corner output w.r.t. the opposite corner input is non-zero (the
    # down / up path, skips and attention connect them), and a loss on the output reaches every
    # parameter (no module left unwired).
    net = _digits(dropout=0.0)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(2, generator=gen, dtype=F64)
    out = net(x, c)
    (gx,) = torch.autograd.grad(out[0, 0, 0, 0], x, retain_graph=True)
    assert float(gx[0, 0, 7, 7].abs()) > 0
    assert float(gx[1].abs().sum()) == 0  # and nothing leaks across the batch
    (out**2).sum().backward()
    unused = [
        n for n, p in net.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0
    ]
    assert not unused, unused


@pytest.mark.parametrize("attn", [(4,), (8,), (8, 4), ()])
def test_attention_sits_at_the_requested_resolutions(attn, gen):
    net = UNet(1, 32, (1, 2), 1, attn_resolutions=attn, image_size=8).double()
    seen = set()
    for module in net.modules():
        if isinstance(module, _AttnBlock):
            module.register_forward_hook(lambda m, i, o: seen.add(i[0].shape[-1]))
    net(torch.randn(1, 1, 8, 8, generator=gen, dtype=F64), torch.zeros(1, dtype=F64))
    # The middle block always attends at the coarsest resolution (4).
    assert seen == set(attn) | {4}


def test_unet_dropout_only_in_train_mode(gen):
    net = _digits(dropout=0.3)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64)
    c = torch.zeros(2, dtype=F64)
    net.eval()
    assert torch.equal(net(x, c), net(x, c))
    net.train()
    assert not torch.equal(net(x, c), net(x, c))


def test_unet_multi_head_attention(gen):
    net = UNet(3, 32, (1, 2), 1, attn_resolutions=(8,), image_size=16, num_heads=4).double()
    out = _per_sample_check(
        net, torch.randn(2, 3, 16, 16, generator=gen, dtype=F64), torch.zeros(2, dtype=F64), 1e-10
    )
    assert out.shape == (2, 3, 16, 16)


def test_cifar10_preset_forward_at_batch_one(gen):
    # docs/paper.md section 5: 128 channels, multipliers [1, 2, 2], 3 blocks, attention at 16,
    # dropout 0.3. This U-Net has 33,962,627 parameters (EDM's DDPM++ at that size has ~56M; the
    # architectures differ, no equality is claimed).
    cfg = UNET_PRESETS["cifar10"]
    assert (cfg["base_channels"], cfg["channel_mults"], cfg["num_blocks"]) == (128, (1, 2, 2), 3)
    assert (cfg["attn_resolutions"], cfg["dropout"], cfg["image_size"]) == ((16,), 0.3, 32)
    net = build_unet("cifar10").eval()
    assert 20e6 < count_parameters(net) < 60e6
    seen = set()
    for module in net.modules():
        if isinstance(module, _AttnBlock):
            module.register_forward_hook(lambda m, i, o: seen.add(i[0].shape[-1]))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([0.3]))
    assert out.shape == (1, 3, 32, 32) and bool(torch.isfinite(out).all())
    assert seen == {16, 8}  # the requested 16x16 level and the middle block at 8x8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(image_size=10, channel_mults=(1, 2, 2)),
            "UNet.image_size=10 is invalid: .*divisible",
        ),
        (dict(attn_resolutions=(3,)), r"UNet.attn_resolutions=\[3\] is invalid: .*never reached"),
        (dict(channel_mults=()), r"UNet.channel_mults=\[\] is invalid"),
        (dict(dropout=1.0), "dropout"),
        (dict(base_channels=33), "UNet.base_channels=33 is invalid: use an even"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_heads=3, attn_resolutions=(4,)), "heads=3 is invalid: .*divisible by heads"),
    ],
)
def test_unet_rejects_bad_config(kwargs, match):
    base = dict(in_channels=1, base_channels=32, channel_mults=(1, 2), num_blocks=1, image_size=8)
    with pytest.raises(ValueError, match=match):
        UNet(**{**base, "attn_resolutions": (), **kwargs})


def test_unet_rejects_bad_input_and_unknown_preset():
    net = build_unet("digits")
    with pytest.raises(ValueError, match=r"UNet.x.shape=\(2, 3, 8, 8\) is invalid: use shape"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="c_noise must have shape"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="preset='imagenet' is invalid: use one of"):
        build_unet("imagenet")


def test_backbones_plug_into_the_parametrization(gen):
    # Both follow backbone(x_in, c_noise): wrapped, they satisfy f(x, t_min) = x exactly.
    from gcflows.consistency import ConsistencyModel

    for backbone, shape in ((ToyMLP(2), (4, 2)), (build_unet("digits"), (4, 1, 8, 8))):
        model = ConsistencyModel(backbone, "ve")
        x = torch.randn(*shape, generator=gen)
        assert torch.equal(model(x, 0.002), x)
        assert not torch.equal(model(x, 1.0), x)
        assert isinstance(backbone, nn.Module)
