"""``bnnshift pack``: a patched / folded directory -> a packed directory (bnnshift.runtime)."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import ARG, JSON, QUIET, RECIPE_MODEL, TRUST_RECIPE, ArgList
from ._output import Output


def pack_command(
    src: str = typer.Argument(..., help="A directory written by `bnnshift patch` / `fold`."),
    out_dir: str = typer.Option(..., "-o", "--out", help="Output directory (the float model + packed.safetensors + "
                                                         "packed.json); load it with bnnshift.runtime.load_packed."),
    bench: bool = typer.Option(False, "--bench", help="Time float vs packed (per binary layer and end to end, "
                                                      "batch 1 and 32, 1 thread and all) and print the table."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    model_spec: Optional[str] = RECIPE_MODEL,
    arg: ArgList = ARG,
    trust_recipe: bool = TRUST_RECIPE,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Replace binary conv / linear layers by bit-packed XNOR-popcount layers, each proved.

    Each packed layer is proved on a probe batch; the others stay float with the reason
    (docs/runtime.md)."""
    from .. import validate

    out = Output(json_mode=json_, quiet=quiet)
    validate.check_path(src, "SRC")
    validate.check_output_dir(out_dir, "-o/--out", force=force)
    from ..runtime.cli import run_pack

    payload = run_pack(src, out_dir, bench=bench, model=model_spec, args=arg, trust=trust_recipe, force=force)
    for line in payload.pop("_lines"):
        out.info(line)
    out.result(payload)
