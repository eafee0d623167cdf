"""The one shared set of test parts: the sign STE, a binary activation module, a binary conv,
small models, and the helpers every test module would otherwise write again (``duplicates``
finds the copies). Import as ``from models import SignSTE, SignAct, ...`` (pytest puts tests/ on
``sys.path``). Model *files* loaded by spec (``tests/models/tiny_bnn.py:build``) live beside."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
TINY_BNN = HERE / "tiny_bnn.py"  # a user's model file: PolySign STE module, BN, residual (1x16x16)


class SignSTE(torch.autograd.Function):
    """``sign(x)`` forward, clipped identity backward (``g * (|x| <= 1)``): the STE of
    BinaryNet / XNOR-Net as users write it (``SignSTE.apply(x)``); x: any float tensor."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


# the same class as text, for the model files tests write (a user's model file defines its own STE)
SIGN_STE_SOURCE = "\n" + inspect.getsource(SignSTE) + "\n"


class SignAct(nn.Module):
    """A binary activation module: ``SignSTE.apply(x)``."""

    def forward(self, x):
        return SignSTE.apply(x)


class BinConv2d(nn.Conv2d):
    """A conv that binarizes its input and its weight in its own forward (an ``input`` site)."""

    def forward(self, x):
        return F.conv2d(SignSTE.apply(x), SignSTE.apply(self.weight), self.bias, self.stride, self.padding)


class SmallBNN(nn.Module):
    """conv -> BN -> SignAct -> BinConv2d -> BN -> sign STE inline -> linear; input
    ``(N, 1, 8, 8)``, logits ``(N, classes)``. Two activation sites (a module, an inline op)."""

    SHAPE = (1, 8, 8)

    def __init__(self, classes: int = 3, width: int = 6):
        super().__init__()
        self.conv0 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.act = SignAct()
        self.conv1 = BinConv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.act(self.bn0(self.conv0(x)))
        x = SignSTE.apply(self.bn1(self.conv1(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def patched_model(model: nn.Module, shape, config=0.5, **kw) -> nn.Module:
    """``model`` scanned at one sample's ``shape`` and patched in place with ``config`` (a
    shift t or a ``ShiftConfig``; ``kw``: ``trainable``, ``per_channel``...); returns it."""
    from bnnshift.patch import patch_model
    from bnnshift.scan import scan_model

    patch_model(model, scan_model(model, shape, name=type(model).__name__), config, **kw)
    return model


def invoke(*args):
    """``bnnshift ARGS`` in this process (typer's ``CliRunner``; ``str()`` of each argument):
    the result has ``exit_code``, ``stdout``, ``stderr``."""
    from typer.testing import CliRunner

    from bnnshift.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])
