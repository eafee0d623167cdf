"""bnnshift: shift the thresholds of binary activations in PyTorch BNNs (Kim et al., CVPR 2021).

The public API is re-exported here lazily (torch is imported on first use, so the CLI's
``--help`` stays instant)::

    from bnnshift import scan_model, insert_shifts, load_patched, search_with
"""
from __future__ import annotations

import importlib
import sys as _sys

from ._version import __version__

if _sys.argv and (_sys.argv[0] == "-m" or _sys.argv[0].rsplit("/", 1)[-1] in ("bnnshift", "bnnshift.exe")):
    # the command line (``python -m bnnshift`` / the console script), not a library import:
    # Ctrl-C or SIGTERM during the imports ends in one line and 130 / 143 (bnnshift._signals)
    from . import _signals

    _signals.install_early()

_EXPORTS = {
    # scan
    "scan_model": "scan", "Site": "sites", "ScanReport": "sites", "probe_sites": "probe",
    # load / data
    "load_model": "load", "build_model": "load", "parse_model_spec": "load", "load_data": "data",
    "DataBundle": "data",
    # shift / patch / fold / export
    "insert_shifts": "shift", "remove_shifts": "shift", "get_thresholds": "shift",
    "ShiftConfig": "patch", "patch_model": "patch", "save_patched": "patch", "load_patched": "patch",
    "apply_recipe": "patch", "fold_shifts": "fold", "export_onnx": "export",
    # BatchNorm statistics after a shift / fine-tuning
    "recalibrate_bn": "recalibrate", "bn_staleness": "recalibrate",
    # search
    "SearchConfig": "search", "run_candidate": "search", "search_with": "search",
    # plugins
    "registry": None,
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bnnshift' has no attribute {name!r}")
    mod = _EXPORTS[name]
    if mod is None:
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
