"""Backbones ``F(x_in, c_noise)`` for the consistency parametrization (docs/paper.md Eq. 3).

Every network here follows one call signature, ``backbone(x_in, c_noise) -> (B, *dims)`` with
``x_in`` of shape ``(B, *dims)`` (already scaled by ``c_in``) and ``c_noise`` of shape ``(B,)``;
the output has the shape of ``x_in`` (or ``out_channels`` channels for the U-Net). The
preconditioning (``c_skip``, ``c_out``, ``c_in``, ``c_noise``) lives apart, in
``gcflows.consistency.ConsistencyModel``.

- ``ToyMLP``: an MLP for low-dimensional data with a sinusoidal (positional) embedding of the
  noise level (the authors' 2D notebook uses width 256).
- ``UNet``: a U-Net written here (GroupNorm, SiLU, residual blocks conditioned on the time
  embedding, dropout, multi-head self-attention at chosen resolutions, strided-convolution down
  sampling and nearest-neighbour up sampling with skip connections). ``UNET_PRESETS`` holds the
  8x8 digits preset and the CIFAR-10 preset of docs/paper.md section 5 (128 base channels,
  multipliers [1, 2, 2], 3 blocks per level, attention at 16x16, dropout 0.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcflows.checks import bad, bad_tensor, choice, integer, real, shape

__all__ = [
    "sinusoidal_embedding",
    "SinusoidalEmbedding",
    "ToyMLP",
    "UNet",
    "UNET_PRESETS",
    "build_unet",
    "count_parameters",
]


def sinusoidal_embedding(
    c_noise: Tensor, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0
) -> Tensor:
    """Positional embedding of a scalar per sample: ``(B,) -> (B, dim)``.

    ``emb = [cos(scale c w_k), sin(scale c w_k)]`` with ``w_k = max_period^(-k / (dim / 2))``,
    ``k = 0 .. dim/2 - 1`` (Transformer positional encoding). ``c_noise = log(sigma) / 4`` spans
    only a few units, hence the default ``scale = 1000`` (the range of DDPM's integer timesteps).
    Computed in float64 for float64 input, in float32 otherwise (half precision included).
    """
    if dim < 2 or dim % 2:
        raise bad("dim", dim, "use an even integer >= 2")
    if c_noise.dim() != 1:
        raise bad_tensor(c_noise, "c_noise", "use shape (B,)")
    half = dim // 2
    work = c_noise.dtype if c_noise.dtype == torch.float64 else torch.float32
    k = torch.arange(half, device=c_noise.device, dtype=work)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = (scale * c_noise.to(work))[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(c_noise.dtype)


class SinusoidalEmbedding(nn.Module):
    """Module form of :func:`sinusoidal_embedding` (no parameters)."""

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise bad("dim", dim, "use an even integer >= 2")
        self.dim, self.scale, self.max_period = int(dim), float(scale), float(max_period)

    def forward(self, c_noise: Tensor) -> Tensor:
        return sinusoidal_embedding(c_noise, self.dim, scale=self.scale, max_period=self.max_period)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ToyMLP(nn.Module):
    """MLP backbone for vectors ``(B, dim)``: ``F(x_in, c_noise) -> (B, dim)``.

    ``h = W_in x_in + T(emb(c_noise))``, then ``depth`` residual layers
    ``h <- h + W_l dropout(SiLU(h + T_l(emb)))``, then ``W_out SiLU(h)``. ``T`` is a two-layer MLP
    of the sinusoidal embedding; each layer adds its own projection of it.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_embed_dim: int = 64,
        dropout: float = 0.0,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            integer(val, name, lo=1, where="ToyMLP")
        if not (integer(time_embed_dim, "time_embed_dim", lo=2, where="ToyMLP") % 2 == 0):
            raise bad("time_embed_dim", time_embed_dim, "use an even integer >= 2", "ToyMLP")
        real(dropout, "dropout", lo=0.0, hi_open=1.0, where="ToyMLP")
        self.dim, self.hidden, self.depth = int(dim), int(hidden), int(depth)
        self.time_embed_dim, self.time_scale = int(time_embed_dim), float(time_scale)
        self.embed = SinusoidalEmbedding(time_embed_dim, time_scale)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.inp = nn.Linear(dim, hidden)
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise bad_tensor(x, "x", f"use shape (B, {self.dim})", "ToyMLP")
        shape(c_noise, (x.shape[0],), "ToyMLP: c_noise", "to match the batch")
        emb = self.time_mlp(self.embed(c_noise.to(x.dtype)))
        h = self.inp(x) + emb
        act = F.silu(emb)
        for proj, layer in zip(self.time_proj, self.layers, strict=True):
            h = h + layer(self.dropout(F.silu(h + proj(act))))
        return self.out(F.silu(h))


def _groups(channels: int, max_groups: int) -> int:
    """Largest group count ``<= max_groups`` dividing ``channels`` (GroupNorm needs a divisor)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class _ResBlock(nn.Module):
    """``GN-SiLU-conv3 (+ time) GN-SiLU-dropout-conv3`` plus a (1x1 when widths differ) skip,
    summed and scaled by ``1 / sqrt(2)``."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * (1.0 / math.sqrt(2.0))


class _AttnBlock(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, residual, scaled by ``1/sqrt 2``."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            fix = f"attention channels {channels} must be divisible by heads; use a divisor"
            raise bad("heads", heads, fix)
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # (B, heads, HW, c/heads) layout for scaled_dot_product_attention.
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * (1.0 / math.sqrt(2.0))


class _Down(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_unet(
    in_channels,
    base_channels,
    channel_mults,
    num_blocks,
    dropout,
    attn_resolutions,
    image_size,
    num_heads,
    num_groups,
) -> tuple[list[int], list[int], set[int]]:
    """The checks of :class:`UNet`'s arguments; returns the channel multipliers, the resolution of
    each level and the attention resolutions."""
    for name, val in (
        ("in_channels", in_channels),
        ("base_channels", base_channels),
        ("num_blocks", num_blocks),
        ("image_size", image_size),
        ("num_heads", num_heads),
        ("num_groups", num_groups),
    ):
        integer(val, name, lo=1, where="UNet")
    mults = [int(m) for m in channel_mults]
    if not mults or any(m < 1 for m in mults):
        raise bad("channel_mults", mults, "use a non-empty list of positive ints", "UNet")
    if image_size % (2 ** (len(mults) - 1)):
        fix = (
            f"it must be divisible by 2^(len(channel_mults) - 1) = {2 ** (len(mults) - 1)}; "
            "use fewer levels or another size"
        )
        raise bad("image_size", image_size, fix, "UNet")
    if base_channels % 2:
        raise bad("base_channels", base_channels, "use an even number (embedding width)", "UNet")
    real(dropout, "dropout", lo=0.0, hi_open=1.0, where="UNet")
    resolutions = [image_size // 2**i for i in range(len(mults))]
    attn = {int(r) for r in attn_resolutions}
    unreachable = sorted(attn - set(resolutions))
    if unreachable:
        fix = f"these are never reached; the levels run at {resolutions}"
        raise bad("attn_resolutions", unreachable, fix, "UNet")
    return mults, resolutions, attn


class UNet(nn.Module):
    """U-Net backbone for images ``(B, in_channels, image_size, image_size)``.

    Encoder: a 3x3 input convolution to ``base_channels``, then for each level ``i`` (resolution
    ``image_size / 2^i``) ``num_blocks`` residual blocks of width ``base_channels *
    channel_mults[i]`` (each followed by self-attention when the resolution is in
    ``attn_resolutions``), and a stride-2 convolution between levels. Middle: residual,
    attention, residual. Decoder: per level, ``num_blocks + 1`` residual blocks, each taking the
    concatenation with one stored encoder activation (skip connection), attention where chosen,
    and nearest-neighbour x2 up sampling plus a 3x3 convolution between levels. Output:
    GroupNorm, SiLU, 3x3 convolution to ``out_channels``. The time embedding is a two-layer MLP of
    the sinusoidal embedding of ``c_noise`` (width ``4 * base_channels``), added in every
    residual block.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_blocks: int = 3,
        dropout: float = 0.0,
        attn_resolutions: Sequence[int] = (16,),
        image_size: int = 32,
        out_channels: int | None = None,
        num_heads: int = 1,
        num_groups: int = 32,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        mults, resolutions, attn = _check_unet(
            in_channels,
            base_channels,
            channel_mults,
            num_blocks,
            dropout,
            attn_resolutions,
            image_size,
            num_heads,
            num_groups,
        )
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.out_channels = int(out_channels or in_channels)
        self.base_channels, self.time_scale = int(base_channels), float(time_scale)
        self.config = dict(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mults=tuple(mults),
            num_blocks=num_blocks,
            dropout=dropout,
            attn_resolutions=tuple(sorted(attn)),
            image_size=image_size,
            out_channels=self.out_channels,
            num_heads=num_heads,
            num_groups=num_groups,
            time_scale=time_scale,
        )
        temb = 4 * base_channels
        self.embed = SinusoidalEmbedding(base_channels, time_scale)
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb), nn.SiLU(), nn.Linear(temb, temb)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Encoder. ``enc`` is a flat list run in order; every module's output is stored as a skip.
        self.enc = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for i, m in enumerate(mults):
            for _ in range(num_blocks):
                block = nn.ModuleList([_ResBlock(ch, base_channels * m, temb, dropout, num_groups)])
                ch = base_channels * m
                if resolutions[i] in attn:
                    block.append(_AttnBlock(ch, num_heads, num_groups))
                self.enc.append(block)
                skip_channels.append(ch)
            if i < len(mults) - 1:
                self.enc.append(nn.ModuleList([_Down(ch)]))
                skip_channels.append(ch)

        self.mid = nn.ModuleList(
            [
                _ResBlock(ch, ch, temb, dropout, num_groups),
                _AttnBlock(ch, num_heads, num_groups),
                _ResBlock(ch, ch, temb, dropout, num_groups),
            ]
        )

        self.dec = nn.ModuleList()
        for i in reversed(range(len(mults))):
            for _ in range(num_blocks + 1):
                cin = ch + skip_channels.pop()
                block = nn.ModuleList(
                    [_ResBlock(cin, base_channels * mults[i], temb, dropout, num_groups)]
                )
                ch = base_channels * mults[i]
                if resolutions[i] in attn:
                    block.append(_AttnBlock(ch, num_heads, num_groups))
                self.dec.append(block)
            if i > 0:
                self.dec.append(nn.ModuleList([_Up(ch)]))
        assert not skip_channels  # every stored activation is consumed exactly once
        self.norm_out = nn.GroupNorm(_groups(ch, num_groups), ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        return h

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise bad_tensor(x, "x", f"use shape (B, {expected})", "UNet")
        shape(c_noise, (x.shape[0],), "UNet: c_noise", "to match the batch")
        emb = self.time_mlp(self.embed(c_noise.to(x.dtype)))
        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = self._run(block, h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        for block in self.dec:
            if isinstance(block[0], _ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


UNET_PRESETS: dict[str, dict] = {
    # scikit-learn digits, 1 x 8 x 8: levels at 8 and 4, attention at 4.
    "digits": dict(
        in_channels=1,
        base_channels=32,
        channel_mults=(1, 2),
        num_blocks=2,
        dropout=0.0,
        attn_resolutions=(4,),
        image_size=8,
    ),
    # CIFAR-10 32 x 32 (docs/paper.md section 5): dropout 0.3 is the paper's value for IC; GC: 0.
    "cifar10": dict(
        in_channels=3,
        base_channels=128,
        channel_mults=(1, 2, 2),
        num_blocks=3,
        dropout=0.3,
        attn_resolutions=(16,),
        image_size=32,
    ),
}


def build_unet(preset: str, **overrides) -> UNet:
    """A ``UNet`` from ``UNET_PRESETS[preset]`` with keyword overrides (e.g. ``dropout=0.0``)."""
    choice(preset, "preset", sorted(UNET_PRESETS))
    return UNet(**{**UNET_PRESETS[preset], **overrides})
