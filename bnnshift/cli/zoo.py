"""``bnnshift zoo``: list the built-in models."""
from __future__ import annotations

from ._common import JSON
from ._output import Output


def zoo_command(json_: bool = JSON):
    """List the built-in zoo models (use them as zoo:NAME)."""
    from rich.table import Table

    from ..registry import ZOO

    out = Output(json_mode=json_)
    rows = [e for _, e in ZOO.items()]
    payload = {"models": [{"name": e.name, "input_shape": list(e.input_shape), "num_classes": e.num_classes,
                           "activation_sites": e.activation_sites, "weight_binarizers": e.weight_binarizers,
                           "style": e.style, "description": e.description} for e in rows]}
    if json_:
        out.result(payload)
        return
    t = Table(title="bnnshift zoo")
    for c in ("name", "input", "sites", "weight bin.", "style"):
        t.add_column(c, no_wrap=True)
    t.add_column("description")
    for e in rows:
        t.add_row(f"zoo:{e.name}", "x".join(map(str, e.input_shape)), str(e.activation_sites),
                  str(e.weight_binarizers), e.style, e.description)
    out.table(t)
