"""Packed replacements of a binary conv2d / linear: one call of ``bnnshift::bconv2d``.

Input: the tensor the original module received (float32 or float64): a +-1 or {0,1} binary
activation, or the pre-activation when the original module binarized its own input; the bit
of an element is ``x > 0`` either way (a pre-activation exactly at 0 is a tie: the float
binarizer's own ``sign(0)`` may differ). Output: what the original module returned,
``dot * alpha + bias`` per output channel (``alpha`` the magnitude of the effective weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import kernel  # noqa: F401 -- registers torch.ops.bnnshift.bconv2d


class PackedConv2d(nn.Module):
    """Binary conv2d on packed bits. Buffers: ``wwords`` int64 (O, KH, KW, Cw), ``popw`` int32
    (O, KH*KW), ``alpha`` (O,) float32, ``bias`` (O,) float32 or absent. ``zero_one``: the
    input alphabet is {0,1} (else +-1). Input (N, C, H, W); output (N, O, Ho, Wo)."""

    def __init__(self, wwords: torch.Tensor, popw: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int, zero_one: bool,
                 in_channels: int):
        super().__init__()
        self.register_buffer("wwords", wwords)
        self.register_buffer("popw", popw)
        from .ref import transpose_weight

        # the kernel's layout (G, K, O/G), derived, not saved
        self.register_buffer("wtrans", transpose_weight(wwords, int(groups)), persistent=False)
        self.register_buffer("alpha", alpha)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups, self.zero_one, self.in_channels = int(groups), bool(zero_one), int(in_channels)

    def config(self) -> dict:
        """The non-tensor attributes (JSON-serialisable), enough to rebuild with the buffers."""
        return {"kind": "conv2d", "stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups, "zero_one": self.zero_one, "in_channels": self.in_channels}

    def float_op(self) -> "callable":
        """The same layer as a plain float op with the two-valued weight precomputed
        (``F.conv2d(x, +-alpha, bias, ...)``): the fair float baseline for timing."""
        import torch.nn.functional as F

        o, kh, kw, cw = self.wwords.shape
        cg = self.in_channels // self.groups
        bits = ((self.wwords.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(o, kh, kw, cw * 64)[..., :cg]
        w = torch.where(bits > 0, 1.0, -1.0) * self.alpha.view(-1, 1, 1, 1)
        w = w.permute(0, 3, 1, 2).contiguous()
        if self.config()["kind"] == "linear":
            w2 = w.reshape(o, cg)
            return lambda x: F.linear(x, w2, self.bias)
        return lambda x: F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return torch.ops.bnnshift.bconv2d(x, self.wwords, self.wtrans, self.popw, self.alpha, self.bias, self.stride, self.padding,
                                          self.dilation, self.groups, self.zero_one)

    def extra_repr(self) -> str:
        o, kh, kw, _ = self.wwords.shape
        return (f"{self.in_channels}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, inputs={'{0,1}' if self.zero_one else '+-1'}")


class _AsLinear:
    """A packed conv2d used as a linear layer: a 1x1 conv on a 1x1 input, (..., C) -> (..., O)."""

    def config(self) -> dict:
        return {**super().config(), "kind": "linear"}  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = super().forward(x.reshape(-1, x.shape[-1], 1, 1))  # type: ignore[misc]
        return y.reshape(*lead, y.shape[1])


class PackedLinear(_AsLinear, PackedConv2d):
    """Binary linear on packed bits (a 1x1 conv on a 1x1 input): input (..., C), output (..., O)."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_channels}, out_features={self.wwords.shape[0]}, " \
               f"inputs={'{0,1}' if self.zero_one else '+-1'}"


class PackedConv2dAct(PackedConv2d):
    """A packed conv2d fused with its BatchNorm, binarizer and an optional MaxPool (``fuse``): it
    returns the binary activation itself (N, O, Hp, Wp), values ``lo`` / ``hi``, from one integer
    threshold per channel. Extra buffers: ``thr`` int64 (2, O) and ``flip`` bool (2, O), row 0 used
    for float32 inputs, row 1 for float64 (ties as the float model decides them in each dtype)."""

    def __init__(self, *args, thr: torch.Tensor, flip: torch.Tensor, pool: list[int], pool_first: bool, lo: float,
                 hi: float, absorbed: list[str]):
        super().__init__(*args)
        self.register_buffer("thr", thr)
        self.register_buffer("flip", flip)
        self.pool, self.pool_first, self.lo, self.hi = list(pool), bool(pool_first), float(lo), float(hi)
        self.absorbed = list(absorbed)

    def config(self) -> dict:
        return {**super().config(), "fused": {"pool": self.pool, "pool_first": self.pool_first, "lo": self.lo,
                                              "hi": self.hi, "absorbed": self.absorbed}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        row = 1 if x.dtype == torch.float64 else 0
        return torch.ops.bnnshift.bconv2d_bits(x, self.wwords, self.wtrans, self.popw, self.thr[row], self.flip[row],
                                               self.stride, self.padding, self.dilation, self.groups, self.zero_one,
                                               self.pool, self.pool_first, self.lo, self.hi)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold through {'->'.join(self.absorbed)}"


class PackedLinearAct(_AsLinear, PackedConv2dAct):
    """A packed linear fused with its BatchNorm1d and binarizer: input (..., C), output (..., O)."""


def fused(layer: PackedConv2d, thr: torch.Tensor, flip: torch.Tensor, pool: list[int], pool_first: bool, lo: float,
          hi: float, absorbed: list[str]) -> PackedConv2dAct:
    """``layer`` with an integer threshold (see :class:`PackedConv2dAct`)."""
    cls = PackedLinearAct if isinstance(layer, PackedLinear) else PackedConv2dAct
    return cls(layer.wwords, layer.popw, layer.alpha, layer.bias, layer.stride, layer.padding, layer.dilation,
               layer.groups, layer.zero_one, layer.in_channels, thr=thr, flip=flip, pool=pool, pool_first=pool_first,
               lo=lo, hi=hi, absorbed=absorbed)


def build_layer(cfg: dict, tensors: dict[str, torch.Tensor]) -> PackedConv2d:
    """Rebuild a packed layer from :meth:`PackedConv2d.config` and its buffers."""
    cls = PackedLinear if cfg["kind"] == "linear" else PackedConv2d
    layer = cls(tensors["wwords"], tensors["popw"], tensors["alpha"], tensors.get("bias"), cfg["stride"],
                cfg["padding"], cfg["dilation"], cfg["groups"], cfg["zero_one"], cfg["in_channels"])
    f = cfg.get("fused")
    if f:
        layer = fused(layer, tensors["thr"], tensors["flip"], f["pool"], f["pool_first"], f["lo"], f["hi"],
                      f["absorbed"])
    return layer
