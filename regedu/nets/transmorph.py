"""TransMorph: a Swin-transformer encoder with a convolutional decoder, 2D or 3D.

Reference: Chen et al., "TransMorph: Transformer for unsupervised medical image
registration", Medical Image Analysis 82, 2022, doi:10.1016/j.media.2022.102615
(the survey's reference [7]); the Swin transformer it builds on: Liu et al.,
"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.

The layout follows the paper's: the pair is cut into patches (a strided
convolution, 1/4 of the size), Swin stages of window self-attention with
shifted windows and a learned relative position bias alternate with patch
merging (half the size, twice the channels); a convolutional decoder upsamples
back, concatenating each stage's tokens and two convolutional skips of the
input at 1/2 and full size; a flow head predicts the displacement, which the
spatial transformer applies. Sizes are small by default so that the course's
2D comparison with the U-Net is at a similar parameter count.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_positive
from ._base import (Registration, check_features, check_spatial_dims, conv_block, crop,
                    make_config, pad_to_multiple, register)

__all__ = ["window_partition", "window_merge", "SwinEncoder", "TransMorphBackbone", "TransMorph"]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Cut a map of tokens into windows: ``(B, *S, C)`` -> ``(B * nW, window**nd, C)``.

    Each size in ``S`` is a multiple of ``window``. Windows come item by item,
    then in row-major order over the grid of windows (the last axis fastest);
    the tokens of a window are in row-major order too. Channels stay last, as
    attention reads them.

    >>> x = torch.arange(16.0).view(1, 4, 4, 1)          # token (i, j) holds 4 i + j
    >>> window_partition(x, 2)[1, :, 0].tolist()           # the top-right 2x2 window
    [2.0, 3.0, 6.0, 7.0]
    """
    B, *S, C = x.shape
    nd = len(S)
    x = x.view(B, *[v for n in S for v in (n // window, window)], C)
    # (B, n0, w, n1, w, ..., C) -> (B, n0, n1, ..., w, w, ..., C)
    order = [0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1]
    return x.permute(order).reshape(-1, window ** nd, C)


def window_merge(w: torch.Tensor, shape: tuple[int, ...], window: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window**nd, C)`` -> ``(B, *shape, C)``."""
    nd = len(shape)
    counts = [n // window for n in shape]
    C = w.shape[-1]
    x = w.view(-1, *counts, *[window] * nd, C)
    # (B, n0, n1, ..., w, w, ..., C) -> (B, n0, w, n1, w, ..., C)
    order = [0, *[v for k in range(nd) for v in (1 + k, 1 + nd + k)], 2 * nd + 1]
    return x.permute(order).reshape(-1, *shape, C)


def _relative_index(window: int, nd: int) -> torch.Tensor:
    """Index into the ``(2 * window - 1)**nd`` relative offsets of every pair of window positions."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * nd, indexing="ij")).flatten(1)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)   # (nd, N, N), each in [0, 2w-2]
    index = torch.zeros_like(offsets[0])
    for k in range(nd):
        index = index * (2 * window - 1) + offsets[k]
    return index


@functools.lru_cache(maxsize=16)
def _shift_mask(shape: tuple[int, ...], window: int, shift: int) -> torch.Tensor:
    """Additive attention mask ``(nW, N, N)`` of a cyclically shifted window partition.

    After rolling by ``shift``, a window at the far edge holds tokens from both
    ends of the image; they must not attend to each other (Swin's mask).
    Cached: every shifted block of every step asks for the same few masks, and
    callers only read them.
    """
    region = torch.zeros(shape, dtype=torch.long)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for k, n in enumerate(shape):
        ids = torch.zeros(n, dtype=torch.long)
        for i, s in enumerate(bounds):
            ids[s] = i
        region = region * 3 + ids.view(*[-1 if j == k else 1 for j in range(len(shape))])
    ids = window_partition(region[None, ..., None], window)[..., 0]           # (nW, N)
    return torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1]).masked_fill(
        ids[:, :, None] != ids[:, None, :], float("-inf"))


class _SwinBlock(nn.Module):
    """Window multi-head self-attention (shifted or not) and an MLP, each pre-normed and residual."""

    def __init__(self, nd: int, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.nd, self.heads, self.window, self.shift = nd, heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros((2 * window - 1) ** nd, heads))
        nn.init.trunc_normal_(self.bias, std=0.02)
        self.register_buffer("index", _relative_index(window, nd), persistent=False)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x: (B, *S, C)
        shape = x.shape[1:-1]
        y = self.norm1(x)
        # Windows must tile the map: pad the far end (Swin pads so too).
        pad = [(-n) % self.window for n in shape]
        if any(pad):
            y = F.pad(y, [0, 0] + [v for p in reversed(pad) for v in (0, p)])
        padded = y.shape[1:-1]
        dims = tuple(range(1, self.nd + 1))
        # A window smaller than the map's side is shifted; one that covers it has nothing to shift.
        shift = self.shift if min(padded) > self.window else 0
        if shift:
            y = torch.roll(y, [-shift] * self.nd, dims)
        y = self._attention(window_partition(y, self.window), padded, shift)
        y = window_merge(y, padded, self.window)
        if shift:
            y = torch.roll(y, [shift] * self.nd, dims)
        y = y[(slice(None), *[slice(0, n) for n in shape])]
        x = x + y
        return x + self.mlp(self.norm2(x))

    def _attention(self, w: torch.Tensor, shape: tuple[int, ...], shift: int) -> torch.Tensor:
        Bw, N, C = w.shape
        q, k, v = self.qkv(w).view(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias[self.index.flatten()].view(N, N, self.heads).permute(2, 0, 1)  # (h, N, N)
        if shift:
            shifted = _shift_mask(shape, self.window, shift).to(w)               # (nW, N, N)
            nW = shifted.shape[0]
            mask = (mask[None, None] + shifted[None, :, None]).expand(
                Bw // nW, nW, self.heads, N, N).reshape(Bw, self.heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class _PatchMerging(nn.Module):
    """Each 2x2(x2) group of tokens -> one token of twice the channels (half the size)."""

    def __init__(self, nd: int, dim: int):
        super().__init__()
        self.nd = nd
        self.norm = nn.LayerNorm(2 ** nd * dim)
        self.reduce = nn.Linear(2 ** nd * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, *S, C), sizes even
        B, *S, C = x.shape
        x = x.view(B, *[v for n in S for v in (n // 2, 2)], C)
        order = [0, *range(1, 2 * self.nd, 2), *range(2, 2 * self.nd + 1, 2), 2 * self.nd + 1]
        x = x.permute(order).reshape(B, *[n // 2 for n in S], 2 ** self.nd * C)
        return self.reduce(self.norm(x))


class SwinEncoder(nn.Module):
    """Patch embedding and Swin stages; returns each stage's features, channels first.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
    embed_dim : int
        Channels of the first stage; each later stage doubles them.
    depths : sequence of int
        Swin blocks per stage (alternating plain and shifted windows).
    heads : sequence of int
        Attention heads per stage (``embed_dim * 2**i`` divisible by ``heads[i]``).
    window : int
        Side of the attention windows, in tokens.
    patch : int
        Side of a patch: the first stage is at ``1/patch`` of the input size.

    The input size must be a multiple of ``patch * 2**(len(depths) - 1)``
    (:class:`TransMorphBackbone` pads to it).
    """

    def __init__(self, spatial_dims: int, in_channels: int, embed_dim: int, depths, heads,
                 window: int, patch: int, mlp_ratio: float = 2.0):
        super().__init__()
        nd = check_spatial_dims(spatial_dims)
        self.embed = getattr(nn, f"Conv{nd}d")(in_channels, embed_dim, patch, stride=patch)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.stages, self.merges = nn.ModuleList(), nn.ModuleList()
        dim = embed_dim
        for i, (depth, h) in enumerate(zip(depths, heads)):
            if dim % h:
                raise ValueError(f"heads: stage {i} has {dim} channels, not divisible by {h} heads")
            self.stages.append(nn.ModuleList(
                _SwinBlock(nd, dim, h, window, window // 2 if b % 2 else 0, mlp_ratio)
                for b in range(depth)))
            self.merges.append(_PatchMerging(nd, dim) if i < len(depths) - 1 else nn.Identity())
            dim = 2 * dim if i < len(depths) - 1 else dim
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dim * 2 ** i) for i in range(len(depths)))
        self.channels = [embed_dim * 2 ** i for i in range(len(depths))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.embed(x)
        x = self.embed_norm(x.movedim(1, -1))        # tokens (B, *S, C)
        features = []
        for blocks, merge, norm in zip(self.stages, self.merges, self.norms):
            for block in blocks:
                x = block(x)
            features.append(norm(x).movedim(-1, 1).contiguous())
            x = merge(x)
        return features


class TransMorphBackbone(nn.Module):
    """Swin encoder + convolutional decoder with TransMorph's two convolutional skips.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Input channels (2 for a grey pair).
    embed_dim, depths, heads, window, patch
        See :class:`SwinEncoder`; ``patch`` is a power of 2 (TransMorph's: 4).
    skip : int
        Channels of the convolutional skip of the input at each size from full
        to ``2 / patch`` (TransMorph: full and 1/2).
    out_features : int
        Channels of the last decoder convolution (the flow head's input).

    Any input size works: it is zero-padded to a multiple of
    ``patch * 2**(len(depths) - 1)`` and the features are cropped back.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, embed_dim: int = 28,
                 depths=(2, 2), heads=(2, 4), window: int = 4, patch: int = 4, skip: int = 8,
                 out_features: int = 16, mlp_ratio: float = 2.0):
        super().__init__()
        nd = check_spatial_dims(spatial_dims)
        depths = check_features(depths, "depths")
        heads = check_features(heads, "heads", len(depths))
        for value, name in ((embed_dim, "embed_dim"), (window, "window"), (patch, "patch"),
                            (skip, "skip"), (out_features, "out_features")):
            check_positive(value, name, integer=True)
        if patch & (patch - 1) or patch < 2:
            raise ValueError(f"patch: expected a power of 2 of at least 2 (the decoder doubles the "
                             f"size back to the input's), got {patch}")
        self.encoder = SwinEncoder(nd, in_channels, embed_dim, depths, heads, window, patch,
                                   mlp_ratio)
        channels = self.encoder.channels
        # Decoder from the deepest stage up to the first, concatenating each stage.
        self.up = nn.ModuleList()
        prev = channels[-1]
        for c in reversed(channels[:-1]):
            self.up.append(conv_block(nd, prev + c, c))
            prev = c
        # From 1/patch up to full size, concatenating a convolutional skip of the input at each
        # size (TransMorph's c1 and c2 at 1/2 and full size for its patch of 4).
        self.levels = patch.bit_length() - 1
        self.skips = nn.ModuleList(conv_block(nd, in_channels, skip) for _ in range(self.levels))
        self.to_full = nn.ModuleList()
        for _ in range(self.levels):
            self.to_full.append(conv_block(nd, prev + skip, out_features))
            prev = out_features
        self.out_features = out_features
        self.multiple = patch * 2 ** (len(depths) - 1)
        self._pool = getattr(F, f"avg_pool{nd}d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, region = pad_to_multiple(x, self.multiple)
        features = self.encoder(x)
        y = features.pop()
        for block in self.up:
            y = block(y, features.pop())
        for level, block in zip(reversed(range(self.levels)), self.to_full):
            image = self._pool(x, 2 ** level) if level else x
            y = block(y, self.skips[level](image))
        return crop(y, region)


@register("transmorph")
class TransMorph(Registration):
    """TransMorph: the backbone above, a flow head, optional integration, a warp.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Channels of each image.
    embed_dim, depths, heads, window, patch, skip, out_features, mlp_ratio
        See :class:`TransMorphBackbone`. The defaults (embed 28, two stages of
        2 blocks, 2 and 4 heads, 4x4 windows) give 2D and 3D models about the
        size of the 2D VoxelMorph U-Net; the paper's 3D TransMorph has embed 96,
        depths (2, 2, 4, 2) and 46.8 M parameters.
    integrate_steps : int
        0, or scaling-and-squaring steps for a diffeomorphic variant
        (TransMorph-diff).

    Convention: ``forward(moving, fixed)`` returns a
    :class:`~regedu.nets.RegistrationOutput`; ``disp`` pulls ``moving`` onto
    the fixed grid, in voxels, channels in tensor-axis order.

    >>> model = TransMorph(spatial_dims=2)
    >>> out = model(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    >>> out.disp.shape, bool(out.disp.abs().max() < 1e-2)
    (torch.Size([1, 2, 37, 45]), True)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, embed_dim: int = 28,
                 depths=(2, 2), heads=(2, 4), window: int = 4, patch: int = 4, skip: int = 8,
                 out_features: int = 16, mlp_ratio: float = 2.0, integrate_steps: int = 0):
        check_positive(in_channels, "in_channels", integer=True)
        backbone = TransMorphBackbone(spatial_dims, 2 * in_channels, embed_dim, depths, heads,
                                      window, patch, skip, out_features, mlp_ratio)
        super().__init__(backbone, spatial_dims, in_channels, integrate_steps=integrate_steps)
        self.config = make_config("transmorph", spatial_dims=spatial_dims, in_channels=in_channels,
                                  embed_dim=embed_dim, depths=depths, heads=heads, window=window,
                                  patch=patch, skip=skip, out_features=out_features, mlp_ratio=mlp_ratio,
                                  integrate_steps=integrate_steps)
