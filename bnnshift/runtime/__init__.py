"""Bit-packed XNOR-popcount CPU runtime for a (folded) BNN (docs/runtime.md).

``pack(model, input_shape)`` replaces each conv2d / linear whose input is a binary activation
and whose effective weight is +-alpha per output channel by a packed layer (``layers``), proved
on probe batches (``pack``); ``pack_dir`` / ``save_packed`` / ``load_packed`` (``io``) write and
read a directory (safetensors + JSON, no pickle); the op ``torch.ops.bnnshift.bconv2d``
(``kernel``) is a C++ kernel built at first use, or the pure-torch reference (``ref``);
``bench`` times float vs packed per layer and end to end.
"""
from __future__ import annotations

from .io import PackOptions, load_packed, pack_dir, save_packed
from .pack import PackReport, pack, pack_model, verify

__all__ = ["PackOptions", "PackReport", "load_packed", "pack", "pack_dir", "pack_model", "save_packed", "verify"]
