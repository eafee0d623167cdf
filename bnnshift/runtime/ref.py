"""Pure-torch reference of the packed binary ops (no compiler needed).

Bit layout shared with the C++ kernel (``_kernel.cpp``):

* activation bits: ``x > 0`` (a ``+1`` of a +-1 input, a ``1`` of a {0,1} input), packed along
  the channels of each group, 64 per int64 word: shape ``(N, H, W, G, Cw)``,
  ``Cw = ceil(C / G / 64)``, bit ``k`` of word ``j`` of group ``g`` is channel
  ``g * C/G + 64 j + k``; the unused high bits of the last word are 0;
* weight bits: the sign of the effective weight (``1`` for ``+alpha``), ``(O, KH, KW, Cw)``,
  output channel ``o`` reads group ``o // (O / G)``; unused bits 0;
* ``popw``: popcount of each weight tap, int32 ``(O, KH * KW)``.

The dot product of one output is exact in integers. For +-1 inputs it is
``nvalid * C/G - 2 * popcount(a XOR w)`` over the taps that fall inside the input (zero padding
of a +-1 input is a 0, which is neither bit: a padded tap contributes nothing, exactly as in
``F.conv2d``); for {0,1} inputs ``sum over taps of popcount(w) - popcount(a XOR w)``
(``= sum of w where a = 1``). The output is ``float(dot) * alpha[o] + bias[o]`` in the input's
dtype, two roundings, no fused multiply-add (the C++ kernel is built with
``-ffp-contract=off``): reference and kernel are bitwise identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_POP8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BITS = torch.tensor([1 << k if k < 63 else -(1 << 63) for k in range(64)], dtype=torch.int64)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Per-word popcount of an int64 tensor (any shape) -> int64 of the same shape."""
    b = words.contiguous().view(torch.uint8).to(torch.int64)
    return _POP8[b].view(*words.shape, 8).sum(-1)


def pack_bits(bits: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Pack a bool tensor ``(N, C, H, W)`` along C per group: int64 ``(N, H, W, G, Cw)``."""
    n, c, h, w = bits.shape
    cg = c // groups
    cw = (cg + 63) // 64
    b = bits.reshape(n, groups, cg, h, w)
    if cw * 64 != cg:
        b = F.pad(b, (0, 0, 0, 0, 0, cw * 64 - cg))
    b = b.reshape(n, groups, cw, 64, h, w).to(torch.int64) * _BITS.view(1, 1, 1, 64, 1, 1)
    return b.sum(3).permute(0, 3, 4, 1, 2).contiguous()  # bits distinct: the sum is an OR


def pack_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign bits of a conv weight ``(O, C/G, KH, KW)`` (or linear ``(O, C)``), ``w > 0`` -> 1.

    Returns ``(words (O, KH, KW, Cw) int64, popw (O, KH*KW) int32)``."""
    if w.dim() == 2:
        w = w[:, :, None, None]
    o, cg, kh, kw = w.shape
    words = pack_bits((w > 0).permute(0, 2, 3, 1).reshape(o * kh * kw, cg, 1, 1))  # (O*KH*KW, 1, 1, 1, Cw)
    words = words.reshape(o, kh, kw, -1).contiguous()
    return words, popcount(words).sum(-1).reshape(o, kh * kw).to(torch.int32)


def transpose_weight(wwords: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel's weight layout: (G, KH*KW*Cw, O/G) int64, made once at pack time."""
    o = wwords.shape[0]
    return wwords.reshape(groups, o // groups, -1).permute(0, 2, 1).contiguous()


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def bconv2d(x: torch.Tensor, wwords: torch.Tensor, popw: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
            stride: list[int], padding: list[int], dilation: list[int], groups: int, zero_one: bool) -> torch.Tensor:
    """Binary conv2d of ``x`` (N, C, H, W), float32/float64, read as bits ``x > 0``.

    ``wwords``/``popw``: :func:`pack_weight`; ``alpha`` (O,) the per-channel weight magnitude;
    ``bias`` (O,) or None; ``zero_one``: the input alphabet is {0,1} (else +-1).
    Returns ``(N, O, Ho, Wo)`` in x's dtype."""
    dot = bdot(x, wwords, popw, stride, padding, dilation, groups, zero_one)
    o = dot.shape[1]
    out = dot.to(x.dtype) * alpha.to(x.dtype).view(1, o, 1, 1)
    if bias is not None:
        out = out + bias.to(x.dtype).view(1, o, 1, 1)
    return out


def bconv2d_bits(x: torch.Tensor, wwords: torch.Tensor, popw: torch.Tensor, thr: torch.Tensor, flip: torch.Tensor,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int, zero_one: bool,
                 pool: list[int], pool_first: bool, lo: float, hi: float) -> torch.Tensor:
    """The binary activation after a binary conv2d, its BatchNorm and its binarizer, from the integer
    dot product alone: ``u = dot >= thr[o]`` (``thr`` int64 (O,)), bit ``u XOR flip[o]`` (``flip``
    bool (O,)). ``pool`` ``[kh, kw, sh, sw]`` (a MaxPool, no padding) or ``[]``: with ``pool_first``
    the pool sits before the binarizer (the bit is ``OR(u) XOR flip``), else after it (``OR(u XOR
    flip)``). Returns ``(N, O, Hp, Wp)`` in x's dtype: ``hi`` where the bit is 1, else ``lo``."""
    dot = bdot(x, wwords, popw, stride, padding, dilation, groups, zero_one)
    u = dot >= thr.view(1, -1, 1, 1)
    f = flip.view(1, -1, 1, 1)
    if pool:
        kh, kw, sh, sw = pool
        if pool_first:
            bit = (F.max_pool2d(u.to(torch.float32), (kh, kw), (sh, sw)) > 0) != f
        else:
            bit = F.max_pool2d((u != f).to(torch.float32), (kh, kw), (sh, sw)) > 0
    else:
        bit = u != f
    return torch.where(bit, torch.tensor(hi, dtype=x.dtype), torch.tensor(lo, dtype=x.dtype))


def bdot(x: torch.Tensor, wwords: torch.Tensor, popw: torch.Tensor, stride: list[int], padding: list[int],
         dilation: list[int], groups: int, zero_one: bool) -> torch.Tensor:
    """The exact integer dot products of a binary conv2d (arguments as :func:`bconv2d`): int64
    ``(N, O, Ho, Wo)``."""
    n, c, h, w = x.shape
    o, kh, kw, cw = wwords.shape
    g = groups
    cg, og = c // g, o // g
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    a = pack_bits(x > 0, g).permute(0, 3, 4, 1, 2)  # (N, G, Cw, H, W)
    a = F.pad(a, (pw, pw, ph, ph))
    valid = F.pad(torch.ones(h, w, dtype=torch.bool), (pw, pw, ph, ph))
    wg = wwords.view(g, og, kh, kw, cw)
    pg = popw.view(g, og, kh, kw).to(torch.int64)
    acc = torch.zeros(n, g, og, ho, wo, dtype=torch.int64)
    nvalid = torch.zeros(ho, wo, dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            sl = a[:, :, :, rows, cols]  # (N, G, Cw, Ho, Wo)
            v = valid[rows, cols]
            pc = popcount(sl[:, :, None] ^ wg[None, :, :, i, j, :, None, None]).sum(3)  # (N, G, Og, Ho, Wo)
            if zero_one:
                acc += torch.where(v, pg[None, :, :, i, j, None, None] - pc, 0)
            else:
                acc += torch.where(v, pc, 0)
                nvalid += v
    dot = acc if zero_one else nvalid * cg - 2 * acc
    return dot.reshape(n, o, ho, wo)
