"""Options shared by several commands (model spec, checkpoint, args, input shape, recipe trust)."""
from __future__ import annotations

from typing import List, Optional

import typer

MODEL = typer.Argument(..., help="Model spec: zoo:NAME, path/to/file.py:factory, package.module:factory, "
                                  "timm:NAME or torchvision:NAME (never pretrained).")
ARG = typer.Option(None, "--arg", help="Factory argument key=value (repeatable).")
CHECKPOINT = typer.Option(None, "--checkpoint", help="Weights: .safetensors or a torch checkpoint loaded with "
                                                   "weights_only=True (inner keys and wrapper prefixes found; "
                                                   "docs/checkpoints.md).")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="One sample's shape C,H,W (or N,C,H,W). Default: the "
                                                     "model's declared size, else the --data samples, else a "
                                                     "guess from the first conv/linear layer.")
NON_STRICT = typer.Option(False, "--non-strict", help="Load only the checkpoint keys that fit; prints "
                                                    "'loaded K of N' and the keys left out; fails when no "
                                                    "parameter fits.")
UNSAFE = typer.Option(False, "--unsafe-load", help="Allow unpickling code from the checkpoint (classes found "
                                                  "from the current folder and the model file's). Only for "
                                                  "files you trust.")
USE_EMA = typer.Option(False, "--use-ema", help="Load the checkpoint's EMA weights (state_dict_ema / model_ema).")
ALLOW_NONFINITE = typer.Option(False, "--allow-nonfinite", help="Load a checkpoint with NaN/inf values "
                                                              "(refused by default, naming the keys).")
OUTPUT_INDEX = typer.Option(None, "--output-index", min=0, help="The logits are element N of a tuple/list "
                                                              "output (default: the first tensor).")
OUTPUT_KEY = typer.Option(None, "--output-key", help="The logits are item K of a dict output.")
RECIPE_MODEL = typer.Option(None, "--model", help="Build the model from this spec instead of the one "
                                                  "patch.json names (a moved directory, or a recipe not "
                                                  "written by you).")
TRUST_RECIPE = typer.Option(False, "--trust-recipe", help="Import and call the file.py:fn / pkg.mod:fn spec "
                                                          "patch.json names although bnnshift did not write "
                                                          "it for you on this machine.")
DEVICE = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (CUDA when available; "
                                               "cuda:LOCAL_RANK under torchrun).")
JSON = typer.Option(False, "--json", help="Print only JSON on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")
VERBOSE = typer.Option(False, "--verbose", help="Also print the peak memory (resident set size) of this process.")


def print_peak_memory(o) -> None:
    """``--verbose``: the process's peak resident memory (``resource.getrusage`` ru_maxrss, KiB
    on Linux, bytes on macOS), one line on stderr, also with --json (--quiet: nothing)."""
    import resource
    import sys as _sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = peak / (1024 * 1024) if _sys.platform == "darwin" else peak / 1024
    o.info(f"peak memory (RSS) {mib:.0f} MiB")

BN_DATA = typer.Option(None, "--data", help="Data spec (as in search): re-estimate the BatchNorm statistics on "
                                            "it first, and say whether they were stale (docs/finetune.md).")
BN_RECALIB_BATCHES = typer.Option(20, "--bn-recalib-batches", min=1,
                                  help="Batches of 256 training samples for the BN re-estimation (with --data).")

MEAN = typer.Option(None, "--mean", help="The model's input normalisation: per-channel mean in [0,1] pixel "
                                         "units (one value for all channels, or e.g. 0.485,0.456,0.406). "
                                         "Default: patch.json's record, a timm model's pretrained_cfg, else "
                                         "the data set's (docs/your-model.md).")
STD = typer.Option(None, "--std", help="Per-channel normalisation std, e.g. 0.229,0.224,0.225 (with --mean).")

ArgList = Optional[List[str]]


def parse_mean_std(mean: str | None, std: str | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``--mean`` / ``--std`` parsed and checked (together, std > 0) before torch is imported."""
    from .. import validate

    m, s = validate.parse_floats(mean, "--mean"), validate.parse_floats(std, "--std")
    validate.check_stream_options("none", m, s, None)
    return m, s


def print_load_notes(out, notes: list[str], checkpoint: dict | None = None) -> None:
    """The load report line and other notes on stderr (``source.say_load_notes``)."""
    from ..source import say_load_notes

    say_load_notes(out, notes, checkpoint)
