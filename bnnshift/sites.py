"""The data model of the scan: a binary-activation *site* and the scan report.

A site is one call site of an activation binarizer. How it is addressed at run time
(see ``_runtime``) is kept next to what the paper cares about (context, threshold, advice)
so that patch, fold, search and the report all read the same object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._compat import alias_attributes
from .vocab import HookMode, SiteKind

# how a shift is applied at run time (the hook mode, ``Site.apply``): bnnshift.vocab.HookMode
APPLY_PRE_HOOK = HookMode.PRE_HOOK  # subtract t from the first input of module call (module, call_index)
APPLY_PRODUCER = HookMode.PRODUCER  # subtract t from the output of producer call (module, call_index)
APPLY_OP = HookMode.OP  # subtract t from the first input of candidate op (scope, op_index)

# the site kind (``Site.kind``): bnnshift.vocab.SiteKind
KIND_MODULE = SiteKind.MODULE  # a binarizer module (each call is a site)
KIND_INPUT = SiteKind.INPUT  # a conv/linear that binarizes its own input in forward
KIND_INLINE = SiteKind.INLINE  # sign / Function.apply / comparison written in a composite forward
KIND_HARDTANH = SiteKind.HARDTANH  # full-precision hardtanh (for --hardtanh-shift), not a binary site

# field name -> JSON key where they differ (the glossary's names in the code, the old keys in files)
_JSON_KEYS = {"own_threshold": "threshold", "bias_sign": "fold_sign"}
_FIELDS_OF_KEYS = {v: k for k, v in _JSON_KEYS.items()}


def target_param(spec: str) -> tuple[str, str] | None:
    """(module path, parameter name) of a fold target: ``bn:PATH`` -> (PATH, "bias") (beta),
    ``bias:PATH.PARAM`` -> (PATH, PARAM); None for anything else."""
    if spec.startswith("bn:"):
        return spec[3:], "bias"
    if spec.startswith("bias:"):
        path, _, pname = spec[5:].rpartition(".")
        return path, pname
    return None


@alias_attributes  # old names ``threshold`` / ``fold_sign``: bnnshift._compat.RENAMED
@dataclass
class Site:
    """One binary-activation call site.

    Addressing: ``apply`` says how a shift is inserted; ``module``/``call_index`` address a
    module call (pre_hook, producer_hook), ``scope``/``op_index`` a candidate op (op).
    Context fields follow the paper: ``producer`` of the pre-activation, ``pool`` between
    the previous weight layer and the site, ``follower`` after the consuming binary layer.
    """

    name: str
    kind: SiteKind  # a str: "module", "input", "inline", "hardtanh"
    op: str  # 'sign', 'heaviside', 'compare', 'BinActive.apply', 'module:BinaryActivation'...
    apply: HookMode  # a str: "pre_hook", "producer_hook", "op"
    module: str | None = None
    call_index: int = 0
    scope: str | None = None
    op_index: int = 0
    alphabet: str = "{-1,+1}"
    producer: str = "unknown"
    producer_module: str | None = None
    pool: str | None = None
    follower: str | None = None
    follower_slope: float | None = None
    # the binarizer's own threshold (its additive parameter or learnable bias: mean/min/max/numel of
    # the t it already applies), not bnnshift's threshold tensor; JSON key "threshold"
    own_threshold: dict[str, float] | None = None
    foldable: str | None = None  # 'bn:PATH', 'bias:PATH.PARAM' or None
    fold_reason: str = ""
    fold_with: list[str] | None = None  # every site whose fold target is the same (all fold together, equal t)
    bias_sign: int | None = None  # +1: the fold target enters as x + b (BN beta too), -1: x - b; JSON "fold_sign"
    # the fold target when the hooked patch lowers it at run time ('bn:PATH' / 'bias:PATH.PARAM';
    # set only for a target of this site alone that is read only inside its module): the hook
    # then computes the fold's own float expression (b - t inside the module's forward), so the
    # folded model equals the hooked one bitwise. None: the shift is ``x - t`` where ``apply`` says.
    shift_into: str | None = None
    advice: list[str] = field(default_factory=list)
    in_leaf: str | None = None  # found inside this untraced leaf
    channels: int | None = None  # size of dim 1 of the pre-activation (for per-channel thresholds)
    fired: bool | None = None  # seen at run time by the probe
    binary_checked: bool | None = None  # the probe saw only two values
    plus_fraction: float | None = None
    zero_fraction: float | None = None  # share of outputs exactly 0 (sign(0) = 0: ternary), sign sites only
    preact: dict[str, float] | None = None  # mean, median, std, skew, min, max of the pre-activation
    gradient: bool | None = None  # does the loss's gradient reach the site's input (an STE)?

    def to_json(self) -> dict[str, Any]:
        """The site as JSON (the keys of docs/scan.schema.json: ``threshold`` for ``own_threshold``,
        ``fold_sign`` for ``bias_sign``; ``kind`` / ``apply`` as their strings)."""
        return {_JSON_KEYS.get(k, k): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Site":
        """The site of a ``to_json()`` record (unknown keys ignored; a ``kind`` / ``apply`` string
        this version does not know is kept as it is)."""
        known = {f for f in cls.__dataclass_fields__}
        fields = {_FIELDS_OF_KEYS.get(k, k): v for k, v in d.items()}
        out = cls(**{k: v for k, v in fields.items() if k in known})
        out.kind, out.apply = SiteKind.coerce(out.kind), HookMode.coerce(out.apply)
        return out

    @property
    def address(self) -> tuple:
        if self.apply == APPLY_OP:
            return (APPLY_OP, self.scope, self.op_index)
        return (self.apply, self.module, self.call_index)


@dataclass
class ScanReport:
    """What ``scan`` found: sites, weight binarizers, leaves, summary and warnings."""

    model: str
    input_shape: tuple[int, ...]
    sites: list[Site]
    weight_binarizers: int
    leaves: list[str]
    leaf_errors: dict[str, str] = field(default_factory=dict)
    traced: bool = True
    hardtanh_sites: list[Site] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    data: str | None = None
    inplace_writes: list[str] = field(default_factory=list)  # parameters the model's forward assigns in place
    layer_summary: dict[str, Any] = field(default_factory=dict)  # summary.layer_summary: per-layer rows + totals
    checkpoint: dict[str, Any] | None = None  # load.LoadReport.to_json() of the checkpoint, or None
    normalisation: dict[str, Any] | None = None  # with data: DataBundle.normalisation_json()
    # binarizers found but left at t = 0 by patch / search, each with why:
    # {"name", "op", "alphabet", "reason"} (a shift-invariant input, a value another site shifts)
    excluded_sites: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        from ._version import __version__

        return {
            "bnnshift_version": __version__,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "data": self.data,
            "checkpoint": self.checkpoint,
            "traced": self.traced,
            "num_sites": self.num_sites,
            "weight_binarizers": self.weight_binarizers,
            "leaves": self.leaves,
            "leaf_errors": self.leaf_errors,
            "sites": [s.to_json() for s in self.sites],
            "hardtanh_sites": [s.to_json() for s in self.hardtanh_sites],
            "summary": self.summary,
            "warnings": self.warnings,
            "inplace_writes": self.inplace_writes,
            "normalisation": self.normalisation,
            "excluded_sites": self.excluded_sites,
        }
