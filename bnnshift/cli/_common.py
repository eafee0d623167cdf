"""Options shared by several commands (model spec, checkpoint, args, input shape)."""
from __future__ import annotations

from typing import List, Optional

import typer

MODEL = typer.Argument(..., help="Model spec: zoo:NAME, path/to/file.py:factory, package.module:factory, "
                                  "timm:NAME or torchvision:NAME (never pretrained).")
ARG = typer.Option(None, "--arg", help="Factory argument key=value (repeatable).")
CHECKPOINT = typer.Option(None, "--checkpoint", help="Weights: .safetensors or a torch state_dict "
                                                   "(loaded with weights_only=True).")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="One sample's shape C,H,W (or N,C,H,W).")
NON_STRICT = typer.Option(False, "--non-strict", help="Load only the checkpoint keys that fit (reported).")
UNSAFE = typer.Option(False, "--unsafe-load", help="Allow unpickling code from the checkpoint. Only for files "
                                                  "you trust.")
JSON = typer.Option(False, "--json", help="Print only JSON on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")

BN_DATA = typer.Option(None, "--data", help="Data spec (as in search): re-estimate the BatchNorm statistics on "
                                            "it first, and say whether they were stale (docs/finetune.md).")
BN_RECALIB_BATCHES = typer.Option(20, "--bn-recalib-batches", min=1,
                                  help="Batches of 256 training samples for the BN re-estimation (with --data).")

ArgList = Optional[List[str]]
