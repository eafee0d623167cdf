"""Phase 5: patch a model — resolve a shift configuration to per-site thresholds, insert them
into the user's own model (``shift.insert_shifts``), and write / rebuild the result.

The artifact is a directory (never a pickled module)::

    OUT/model.safetensors   the FULL state_dict: every original key + one threshold per site
    OUT/patch.json          the recipe (written last): model spec, sites with their addressing,
                            shifts, how each was applied, folded sites, versions, hashes

``load_patched(OUT)`` rebuilds the model from the spec in any fresh process, re-applies the
recipe (no re-scan: ``Site.to_json`` carries the addressing) and loads the weights strictly
with safetensors. ``apply_recipe`` does the same on a model instance the user holds.

Shift precedence (``ShiftConfig``): global < kind < pattern < exact name; ``exclude`` removes.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ._io import atomic_save_safetensors, atomic_write_json, prepare_output_dir, sha256_file
from ._state import model_state, set_state
from ._trust import CODE_KINDS, local_modules, record_trusted, trusted_entry
from .errors import CheckpointError, NoSitesError, PatchError, UntrustedRecipeError, UsageError
from .shift import get_thresholds, insert_shifts, shifted_sites, threshold_key
from .sites import KIND_HARDTANH, KIND_INLINE, KIND_INPUT, KIND_MODULE, ScanReport, Site
from .validate import parse_shift_value  # noqa: F401 (torch-free: the CLI checks --shift before importing torch)

__all__ = [
    "ShiftConfig", "PatchRecipe", "patch_model", "build_recipe", "save_patched", "load_patched",
    "apply_recipe", "read_recipe", "recipe_model_spec", "RECIPE_FILE", "WEIGHTS_FILE",
]

RECIPE_FILE = "patch.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FORMAT = 1
SITE_KINDS = (KIND_MODULE, KIND_INPUT, KIND_INLINE)
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------- config


def is_pattern(key: str) -> bool:
    """``re:...`` (regex) or a glob with ``* ? [``; anything else is an exact site name."""
    return key.startswith("re:") or bool(_GLOB_CHARS & set(key))


def _matcher(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"bad regex {pattern!r}: {exc}", hint="patterns are re:REGEX or a glob") from None
        return lambda name: rx.fullmatch(name) is not None
    if is_pattern(pattern):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: name == pattern


def _few_names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


@dataclass
class ShiftConfig:
    """Which shift each site gets. Precedence (lowest first):

    1. ``shift``: every activation site;
    2. ``kinds``: per site kind (``module``, ``input``, ``inline``);
    3. ``patterns``: glob (``layer1.*``) or regex (``re:layer[12]\\..*``) on site names, in order
       (a later pattern wins over an earlier one);
    4. ``names``: exact site names;

    then ``exclude`` (names or patterns) removes sites. A pattern / name / exclude that matches
    no site is a ``PatchError``.
    """

    shift: float | None = None
    kinds: dict[str, float] = field(default_factory=dict)
    patterns: dict[str, float] = field(default_factory=dict)
    names: dict[str, float] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.shift is not None:
            self.shift = parse_shift_value(self.shift, "shift")
        self.kinds = {str(k): parse_shift_value(v, f"kind {k}") for k, v in self.kinds.items()}
        bad = [k for k in self.kinds if k not in SITE_KINDS]
        if bad:
            raise UsageError(f"unknown site kind {bad[0]!r}", hint=f"kinds: {', '.join(SITE_KINDS)}")
        self.patterns = {str(k): parse_shift_value(v, f"site {k}") for k, v in self.patterns.items()}
        self.names = {str(k): parse_shift_value(v, f"site {k}") for k, v in self.names.items()}
        self.exclude = [str(e) for e in self.exclude]

    @property
    def empty(self) -> bool:
        return self.shift is None and not (self.kinds or self.patterns or self.names)

    def add_site(self, key: str, value: Any) -> None:
        """``--site KEY=T``: KEY is an exact name unless it is a glob or ``re:`` pattern."""
        v = parse_shift_value(value, f"--site {key}")
        (self.patterns if is_pattern(key) else self.names)[key] = v
        if is_pattern(key):
            _matcher(key)  # fail early on a bad regex

    def merged(self, other: "ShiftConfig") -> "ShiftConfig":
        """``other`` layered on top of ``self`` (CLI options over a config file)."""
        return ShiftConfig(
            shift=other.shift if other.shift is not None else self.shift,
            kinds={**self.kinds, **other.kinds},
            patterns={**{k: v for k, v in self.patterns.items() if k not in other.patterns}, **other.patterns},
            names={**self.names, **other.names},
            exclude=list(dict.fromkeys(self.exclude + other.exclude)),
        )

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str = "config") -> "ShiftConfig":
        """A config from a shifts file's table (``shift``, ``kinds``, ``sites``, ``exclude``;
        docs/patch.md) or from :meth:`to_json`'s output (``patterns`` and ``names`` instead of
        ``sites``), so ``ShiftConfig.from_mapping(cfg.to_json()) == cfg``.

        Raises:
            UsageError: an unknown key, a table that is not a table, a bad shift value or regex.
        """
        known = {"shift", "kinds", "sites", "patterns", "names", "exclude"}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(sorted(known))}")
        kinds = d.get("kinds", {}) or {}
        tables = {key: d.get(key, {}) or {} for key in ("sites", "patterns", "names")}
        exclude = d.get("exclude", []) or []
        if not isinstance(kinds, Mapping) or not all(isinstance(t, Mapping) for t in tables.values()):
            raise UsageError(f"{where}: [kinds] and [sites] must be tables", hint="see docs/patch.md")
        if isinstance(exclude, str) or not isinstance(exclude, (list, tuple)):
            raise UsageError(f"{where}: exclude must be a list of names or patterns", hint='exclude = ["fc*"]')
        cfg = cls(shift=d.get("shift"), kinds=dict(kinds), exclude=list(exclude))
        for k, v in tables["patterns"].items():  # to_json's split kept as written (order matters)
            cfg.patterns[str(k)] = parse_shift_value(v, f"site {k}")
            _matcher(str(k))
        for k, v in tables["names"].items():
            cfg.names[str(k)] = parse_shift_value(v, f"site {k}")
        for k, v in tables["sites"].items():
            cfg.add_site(str(k), v)
        return cfg

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> "ShiftConfig":
        """Read a shifts file (format: docs/patch.md)."""
        import tomllib

        p = Path(path)
        try:
            with open(p, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise UsageError(f"config file {p} not found", hint="check --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {p} is not valid TOML: {exc}", hint="see docs/patch.md") from None
        except OSError as exc:
            raise UsageError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        return cls.from_mapping(data, where=str(p))

    def to_json(self) -> dict[str, Any]:
        return {"shift": self.shift, "kinds": dict(self.kinds), "patterns": dict(self.patterns),
                "names": dict(self.names), "exclude": list(self.exclude)}

    def resolve(self, sites: Iterable[Site]) -> dict[str, float]:
        """Site name -> shift for every site that gets one (in site order)."""
        sites = list(sites)
        names = [s.name for s in sites]
        hint = f"existing sites: {_few_names(names)}" if names else "the model has no activation site"
        for key in list(self.patterns) + list(self.exclude):
            m = _matcher(key)
            if not any(m(n) for n in names):
                what = "exclude pattern" if key in self.exclude else "pattern"
                raise PatchError(f"{what} {key!r} matches no site", hint=hint)
        for key in self.names:
            if key not in names:
                raise PatchError(f"no site named {key!r}", hint=hint)
        out: dict[str, float] = {}
        matchers = [(_matcher(k), v) for k, v in self.patterns.items()]
        excluders = [_matcher(e) for e in self.exclude]
        for s in sites:
            v = self.shift
            if s.kind in self.kinds:
                v = self.kinds[s.kind]
            for m, pv in matchers:
                if m(s.name):
                    v = pv
            if s.name in self.names:
                v = self.names[s.name]
            if v is None or any(e(s.name) for e in excluders):
                continue
            out[s.name] = float(v)
        return out


# --------------------------------------------------------------------------- patch


@dataclass
class _PatchState:
    """What a patch did, kept on the model (``_state.model_state(model).patch``) for recipe and fold."""

    shifts: dict[str, float]
    hardtanh_shifts: dict[str, float]
    trainable: bool
    per_channel: bool
    folded: dict[str, str] = field(default_factory=dict)  # site name -> 'bn:PATH' / 'bias:PATH.PARAM'
    sites: list[Site] = field(default_factory=list)
    hardtanh_sites: list[Site] = field(default_factory=list)
    config: dict[str, Any] | None = None


def patch_state(model: nn.Module) -> _PatchState | None:
    """What ``patch_model`` / ``apply_recipe`` did to ``model`` (None when neither did)."""
    return model_state(model).patch


def patch_model(model: nn.Module, report_or_sites: ScanReport | Iterable[Site], config: ShiftConfig | float | None,
                *, trainable: bool = False, per_channel: bool = False, hardtanh_shift: float | None = None,
                hardtanh_sites: Iterable[Site] | None = None) -> nn.Module:
    """Insert ``x - t`` before every binarizer the config gives a shift (in place); returns ``model``.

    ``report_or_sites``: a ``ScanReport`` (its ``sites`` and ``hardtanh_sites``) or a list of
    sites. ``config``: a ``ShiftConfig`` or a number (one shift for every site).
    ``hardtanh_shift``: also shift every ``nn.Hardtanh`` (full-precision pretraining stage).
    Raises ``PatchError`` (unknown site / pattern), ``UsageError`` (bad value),
    ``NoSitesError`` (nothing to shift).
    """
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        config = ShiftConfig(shift=config)
    config = config or ShiftConfig()
    if isinstance(report_or_sites, ScanReport):
        sites = list(report_or_sites.sites)
        ht_sites = list(hardtanh_sites if hardtanh_sites is not None else report_or_sites.hardtanh_sites)
    else:
        sites = list(report_or_sites)
        ht_sites = list(hardtanh_sites or [])
    shifts = config.resolve(sites)
    ht_shifts: dict[str, float] = {}
    if hardtanh_shift is not None:
        t = parse_shift_value(hardtanh_shift, "--hardtanh-shift")
        taken = {s.address for s in sites if s.name in shifts}
        act_names = {s.name for s in sites}
        ht_sites = [s for s in ht_sites if s.address not in taken and s.name not in act_names]
        if not ht_sites:
            raise NoSitesError("--hardtanh-shift: the model has no nn.Hardtanh activation to shift",
                               hint="only nn.Hardtanh modules are shifted")
        ht_shifts = {s.name: t for s in ht_sites}
    else:
        ht_sites = []
    if not shifts and not ht_shifts:
        if not sites:
            raise NoSitesError("no binary activation to shift", hint="run `bnnshift scan` on the model")
        raise PatchError("the configuration gives no site a shift",
                         hint="pass --shift T, --site PATTERN=T or a config file")
    all_sites = [s for s in sites if s.name in shifts] + ht_sites
    insert_shifts(model, all_sites, {**shifts, **ht_shifts}, trainable=trainable, per_channel=per_channel)
    set_state(model, patch=_PatchState(shifts=shifts, hardtanh_shifts=ht_shifts, trainable=trainable,
                                       per_channel=per_channel, sites=[s for s in sites if s.name in shifts],
                                       hardtanh_sites=ht_sites, config=config.to_json()))
    return model


# --------------------------------------------------------------------------- recipe


def _site_record(s: Site, shift: float, folded_into: str | None) -> dict[str, Any]:
    d = s.to_json()
    d["shift"] = shift
    d["threshold_key"] = threshold_key(s)
    d["folded_into"] = folded_into
    d["applied"] = f"folded into {folded_into}" if folded_into else s.apply
    return d


@dataclass
class PatchRecipe:
    """The manifest of a patched model (``patch.json``). JSON schema: docs/patch.md.

    ``sites`` / ``hardtanh_sites``: ``Site.to_json()`` plus ``shift`` (the value t the
    threshold was initialised with), ``threshold_key`` (its state_dict key while unfolded),
    ``folded_into`` (``bn:PATH`` / ``bias:PATH.PARAM`` or null) and ``applied``.

    ``model``: ``ModelSpec.to_json()``; in ``patch.json`` a file target is relative to the
    directory (``path_at_patch`` keeps where it was, ``sha256`` its bytes). ``checkpoint``: the
    load report (``load.LoadReport.to_json()``: path, sha256, inner key, prefix, loaded K of N,
    missing / unexpected / shape-mismatched keys) or null; its path relative like the model's.
    In memory (after ``read_recipe``) both paths are absolute again.
    """

    model: dict[str, Any] | None
    input_shape: list[int] | None
    sites: list[dict[str, Any]]
    hardtanh_sites: list[dict[str, Any]] = field(default_factory=list)
    trainable: bool = False
    per_channel: bool = False
    factory_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str | None] = field(default_factory=dict)
    # the model's input normalisation: {"mean": [..], "std": [..], "source": "--mean/--std" |
    # "timm pretrained_cfg" | ...} in [0, 1] pixel units, or null (not known); fold / export --data
    # normalise their data with it unless --mean/--std are given
    normalisation: dict[str, Any] | None = None
    format: int = RECIPE_FORMAT

    @property
    def folded(self) -> list[str]:
        return [d["name"] for d in self.sites if d.get("folded_into")]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["folded"] = self.folded
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PatchRecipe":
        if not isinstance(d, Mapping) or "sites" not in d:
            raise CheckpointError("patch.json is not a bnnshift recipe (no 'sites')", hint="re-run bnnshift patch")
        if int(d.get("format", 0)) > RECIPE_FORMAT:
            raise CheckpointError(f"patch.json has format {d.get('format')}, newer than this bnnshift ({RECIPE_FORMAT})",
                                  hint="upgrade bnnshift")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _versions() -> dict[str, str]:
    from ._version import __version__

    return {"bnnshift": __version__, "torch": torch.__version__}


def build_recipe(model: nn.Module, *, spec: Any = None, input_shape: Iterable[int] | None = None,
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None,
                 load_report: Any = None, normalisation: Mapping[str, Any] | None = None) -> PatchRecipe:
    """The recipe of a model patched by ``patch_model`` (``spec``: a ``load.ModelSpec`` or None;
    ``load_report``: the ``load.LoadReport`` of its checkpoint, written as the ``checkpoint``
    record; ``normalisation``: the model's input normalisation ``{"mean": [..], "std": [..],
    "source": str}`` in [0, 1] pixel units, recorded for ``fold`` / ``export --data``)."""
    st = patch_state(model)
    if st is None:
        raise PatchError("the model was not patched by bnnshift.patch.patch_model", hint="call patch_model first")
    spec_json = spec.to_json() if spec is not None and hasattr(spec, "to_json") else (dict(spec) if spec else None)
    return PatchRecipe(
        model=spec_json,
        factory_args=dict((spec_json or {}).get("args") or {}),
        input_shape=list(input_shape) if input_shape is not None else None,
        sites=[_site_record(s, st.shifts[s.name], st.folded.get(s.name)) for s in st.sites],
        hardtanh_sites=[_site_record(s, st.hardtanh_shifts[s.name], None) for s in st.hardtanh_sites],
        trainable=st.trainable, per_channel=st.per_channel, config=st.config,
        checkpoint=_checkpoint_record(checkpoint, checkpoint_sha256, load_report),
        versions=_versions(), hashes={"model.safetensors": None, "checkpoint": checkpoint_sha256,
                                      BN_STATS_KEY: weights_digest(model)},
        normalisation=dict(normalisation) if normalisation else None,
    )


# patch.json ``hashes[BN_STATS_KEY]``: the ``weights_digest`` of the weights the BatchNorm running
# statistics were last known to fit (the checkpoint's at patch time; after ``fold --data``, the
# re-estimated ones). A directory whose weights differ (fine-tuned) gets the note to re-estimate.
BN_STATS_KEY = "bn_statistics_for"


def weights_digest(model: nn.Module) -> str:
    """sha256 (``_io.sha256_state_dict``) of the parameters with 2 or more dimensions (conv /
    linear weights), thresholds excluded: what fine-tuning changes and ``fold`` (BN bias,
    learnable bias) and BN re-estimation (buffers) never do. A learnable bias that is a fold
    target (``bias:PATH.PARAM`` of a patched site, e.g. ReActNet's ``(1, C, 1, 1)`` move) is
    excluded too: ``fold`` writes ``t`` into it, which is not fine-tuning."""
    from ._io import sha256_state_dict

    targets = _bias_fold_targets(model)
    return sha256_state_dict({k: p for k, p in model.named_parameters()
                              if p.dim() >= 2 and "bnnshift_threshold" not in k and k not in targets})


def _bias_fold_targets(model: nn.Module) -> set[str]:
    """Parameter names a patched site folds (or would fold) its ``t`` into (``bias:`` targets)."""
    st = patch_state(model)
    if st is None:
        return set()
    specs = [getattr(s, "foldable", None) or "" for s in st.sites] + list(st.folded.values())
    return {spec[5:] for spec in specs if spec.startswith("bias:")}


def bn_statistics_current(model: nn.Module, recipe: PatchRecipe) -> bool:
    """True when ``model``'s weights are those its BatchNorm statistics were last known to fit
    (``recipe.hashes[BN_STATS_KEY]``): not fine-tuned since ``patch`` or ``fold --data``."""
    want = (recipe.hashes or {}).get(BN_STATS_KEY)
    return bool(want) and want == weights_digest(model)


def bn_statistics_stale(model: nn.Module, recipe: PatchRecipe) -> bool:
    """True when ``model`` has BatchNorm layers with running statistics and its weights changed
    since those statistics were last known to fit them (fine-tuned after ``patch``; the note
    that asks to re-estimate them: ``fold`` / ``export`` with ``--data``)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())
    return has_bn and not bn_statistics_current(model, recipe)


def _checkpoint_record(path: str | None, sha: str | None, load_report: Any) -> dict[str, Any] | None:
    if load_report is not None and hasattr(load_report, "to_json"):
        rec = dict(load_report.to_json())
    elif isinstance(load_report, Mapping):
        rec = dict(load_report)
    elif path is None:
        return None
    else:
        rec = {}
    if path is not None:
        rec["path"] = str(path)
    if sha is not None:
        rec["sha256"] = sha
    return rec


def _rel(path: str, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX separators) where possible, else unchanged."""
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()
    except ValueError:  # another drive on Windows
        return path


def _portable(d: dict[str, Any], out: Path) -> dict[str, Any]:
    """The recipe as written to ``out/patch.json``: file paths relative to ``out`` + sha256."""
    d = json.loads(json.dumps(d, default=str))
    m = d.get("model")
    if isinstance(m, dict) and m.get("kind") == "file" and m.get("target"):
        target = str(m["target"])
        if os.path.isabs(target):
            if os.path.isfile(target) and not m.get("sha256"):
                m["sha256"] = sha256_file(target)
            m["path_at_patch"] = target
            m["target"] = _rel(target, out)
    c = d.get("checkpoint")
    if isinstance(c, dict) and c.get("path") and os.path.isabs(str(c["path"])):
        c["path_at_patch"] = str(c["path"])
        c["path"] = _rel(str(c["path"]), out)
    return d


def _localise(recipe: PatchRecipe, directory: Path) -> PatchRecipe:
    """Relative paths of a recipe read from ``directory`` made absolute (inverse of ``_portable``)."""
    m = recipe.model
    if isinstance(m, dict) and m.get("kind") == "file" and m.get("target") and not os.path.isabs(str(m["target"])):
        m["target"] = os.path.normpath(os.path.join(os.path.abspath(directory), str(m["target"])))
    c = recipe.checkpoint
    if isinstance(c, str):  # recipes before the load report: a bare path
        c = recipe.checkpoint = {"path": c, "sha256": (recipe.hashes or {}).get("checkpoint")}
    if isinstance(c, dict) and c.get("path") and not os.path.isabs(str(c["path"])):
        c["path"] = os.path.normpath(os.path.join(os.path.abspath(directory), str(c["path"])))
    return recipe


def _refresh_recipe(model: nn.Module, recipe: PatchRecipe) -> PatchRecipe:
    """Record in ``recipe`` the sites that ``fold`` absorbed since it was built, and that the
    BatchNorm statistics fit the weights when ``recalibrate_bn`` estimated them for exactly these
    weights (``hashes[BN_STATS_KEY]``)."""
    from .recalibrate import FRESH_ATTR

    fresh = getattr(model, FRESH_ATTR, None)
    if fresh and fresh == weights_digest(model):
        recipe.hashes = {**(recipe.hashes or {}), BN_STATS_KEY: fresh}
    st = patch_state(model)
    if st is not None:
        for d in recipe.sites:
            if d["name"] in st.folded and not d.get("folded_into"):
                d["folded_into"] = st.folded[d["name"]]
                d["applied"] = f"folded into {d['folded_into']}"
    return recipe


def save_patched(model: nn.Module, recipe: PatchRecipe, out_dir: str | os.PathLike[str], *, force: bool = False,
                 record_trust: bool | None = None) -> Path:
    """Write ``OUT/model.safetensors`` (full state_dict) then ``OUT/patch.json`` (last), atomically.

    Refuses an existing non-empty directory unless ``force``. On failure no new file is left
    (an already existing directory keeps its previous complete pair). Returns the directory.

    ``record_trust``: add the written recipe to the local trust record (``bnnshift._trust``) when
    its model spec is code (``file.py:fn`` / ``pkg.mod:fn``), pinning the model file and the local
    modules it imported. None (default): for a recipe built in this process (``build_recipe``:
    the spec the user named) and for a recipe read from a directory (``read_recipe``) only when
    the record already trusts those bytes (a fine-tuned copy of your own directory); never for
    one from elsewhere, even if it was opened with ``model=`` / ``trust=True``. ``bnnshift fold``
    and ``export --data`` pass it explicitly.
    """
    out = prepare_output_dir(out_dir, force=force)
    recipe = _refresh_recipe(model, recipe)
    weights = out / WEIGHTS_FILE
    existed = weights.exists()
    try:
        sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        atomic_save_safetensors(sd, weights, metadata={"format": "pt", "bnnshift_recipe": RECIPE_FILE})
        recipe.hashes = {**recipe.hashes, "model.safetensors": sha256_file(weights)}
        recipe.versions = _versions()
        atomic_write_json(out / RECIPE_FILE, _portable(recipe.to_json(), out))
        # written by bnnshift for this user: a code spec in it may be rebuilt without a flag
        if record_trust is None:  # built here from the user's spec, or a rewrite of a recipe the record trusts
            sha = getattr(recipe, "sha256", None)
            record_trust = sha is None or trusted_entry(sha) is not None
        if record_trust and isinstance(recipe.model, Mapping) and recipe.model.get("kind") in CODE_KINDS:
            src = _spec_source(recipe.model)
            record_trusted(sha256_file(out / RECIPE_FILE), out, local_modules(src) if src else {})
    except BaseException:
        if not existed:
            try:
                weights.unlink()
            except OSError:
                pass
        raise
    return out


def read_recipe(path: str | os.PathLike[str]) -> PatchRecipe:
    """Read ``patch.json`` (a directory or the file itself); relative paths in it are resolved
    against its directory. ``recipe.sha256`` is the hash of the bytes read (the trust key)."""
    import hashlib

    p = Path(path)
    if p.is_dir():
        p = p / RECIPE_FILE
    try:
        raw = p.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p} not found", hint="the directory must be written by `bnnshift patch`") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {p}: {exc}", hint="re-run bnnshift patch") from None
    recipe = _localise(PatchRecipe.from_json(data), p.parent)
    recipe.sha256 = hashlib.sha256(raw).hexdigest()
    return recipe


def _sites_of(records: list[dict[str, Any]]) -> list[Site]:
    return [Site.from_json(d) for d in records]


def apply_recipe(model: nn.Module, recipe_or_path: PatchRecipe | str | os.PathLike[str], *,
                 include_folded: bool = True) -> nn.Module:
    """Insert the recipe's thresholds into ``model`` (in place; no scan); returns ``model``.

    For a model instance the user holds with its *original* weights: folded sites are applied
    as hooks too (``include_folded``), since its BN biases do not contain them. Threshold
    values are the recipe's shifts; load the directory's weights afterwards to get trained ones.
    """
    recipe = recipe_or_path if isinstance(recipe_or_path, PatchRecipe) else read_recipe(recipe_or_path)
    act = [d for d in recipe.sites if include_folded or not d.get("folded_into")]
    sites = _sites_of(act)
    ht = _sites_of(recipe.hardtanh_sites)
    shifts = {d["name"]: float(d["shift"]) for d in act}
    ht_shifts = {d["name"]: float(d["shift"]) for d in recipe.hardtanh_sites}
    if sites or ht:
        insert_shifts(model, sites + ht, {**shifts, **ht_shifts}, trainable=recipe.trainable,
                      per_channel=recipe.per_channel)
    folded = {} if include_folded else {d["name"]: d["folded_into"] for d in recipe.sites if d.get("folded_into")}
    set_state(model, patch=_PatchState(
        shifts={d["name"]: float(d["shift"]) for d in recipe.sites}, hardtanh_shifts=ht_shifts,
        trainable=recipe.trainable, per_channel=recipe.per_channel, folded=folded,
        sites=_sites_of(recipe.sites), hardtanh_sites=ht, config=recipe.config))
    return model


def _module_file(target: str) -> str | None:
    """The source file of module ``target`` found on ``sys.path`` (and the cwd) without importing
    anything (``importlib.util.find_spec`` would run the parent packages' ``__init__``)."""
    parts = [p for p in str(target).split(".") if p]
    if not parts or any(not p.isidentifier() for p in parts):
        return None
    for entry in [*sys.path, os.getcwd()]:
        base = os.path.join(entry or os.getcwd(), *parts)
        for cand in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(cand):
                return os.path.abspath(cand)
    return None


def _spec_source(m: Mapping[str, Any]) -> str | None:
    """The file a code spec imports (a ``file`` spec's target, a ``module`` spec's source file)."""
    if m.get("kind") == "file":
        t = str(m.get("target") or "")
        return os.path.abspath(t) if t and os.path.isfile(t) else None
    mod = sys.modules.get(str(m.get("target") or ""))
    f = getattr(mod, "__file__", None)
    return os.path.abspath(f) if isinstance(f, str) and f.endswith(".py") else _module_file(str(m.get("target") or ""))


def _check_pins(entry: Mapping[str, Any], source: str | None, recipe_file: Path) -> None:
    """Every file the trust record pinned for this recipe still hashes to its recorded value."""
    pins = entry.get("pins") or {}
    if not pins:
        return
    if source is None:
        raise CheckpointError(f"the model code of {recipe_file} is not found (pinned: {', '.join(sorted(pins))})",
                              hint="pass --model SPEC to build the model yourself")
    folder = Path(source).parent
    for rel, want in sorted(pins.items()):
        f = folder / rel
        try:
            got = sha256_file(f)
        except OSError:
            got = None
        if got != want:
            what = "is missing" if got is None else "changed since it was patched (sha256 differs from the trust record)"
            raise CheckpointError(f"{f} {what}; {recipe_file} names code that imports it; nothing was run",
                                  hint=f"pass --model SPEC to use the code as it is now (or re-run bnnshift patch)")


def _describe_spec(m: Mapping[str, Any]) -> str:
    where = m.get("path_at_patch") or m.get("target")
    args = m.get("args") or {}
    return f"{m.get('kind')} {where}:{m.get('attr')}" + (f" with args {json.dumps(args)[:80]}" if args else "")


def recipe_model_spec(recipe: PatchRecipe, directory: str | os.PathLike[str], *, trust: bool = False):
    """The ``load.ModelSpec`` to rebuild ``recipe``'s model, after the trust rules (module
    ``bnnshift._trust``): zoo/timm/torchvision specs always; a ``file.py:fn`` / ``pkg.mod:fn``
    spec only if ``trust`` or the recipe's bytes are in the local trust record, and a file only
    if its sha256 still matches the one recorded. Raises ``UntrustedRecipeError`` (exit 1),
    ``CheckpointError`` (file changed or missing), ``UsageError`` (no spec)."""
    from .load import ModelSpec

    out = Path(directory)
    if not recipe.model:
        raise UsageError(f"{out / RECIPE_FILE} has no model spec (the model was patched in memory)",
                         hint="pass the model: --model SPEC, or load_patched(dir, model=...)")
    m = dict(recipe.model)
    spec = ModelSpec.from_json(m)
    if spec.kind not in CODE_KINDS:
        return spec
    sha = getattr(recipe, "sha256", None)
    entry = None if trust else trusted_entry(sha)
    found = None
    if spec.kind == "file":
        candidates = [spec.target] + ([m["path_at_patch"]] if m.get("path_at_patch") else [])
        found = next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)
        if found is None and (trust or entry is not None):
            raise CheckpointError(f"the model file of {out / RECIPE_FILE} is not found ({' or '.join(candidates)})",
                                  hint="pass --model path/to/file.py:" + str(spec.attr))
    if not trust and entry is None:
        what = _describe_spec(m) if found is None else f"file {found}:{spec.attr}" + (
            f" with args {json.dumps(m.get('args'))[:80]}" if m.get("args") else "")
        raise UntrustedRecipeError(
            f"{out / RECIPE_FILE} names code to import and call ({what}) and was not written by "
            "bnnshift for you on this machine; nothing was run",
            hint="pass --model SPEC to build the model yourself, or --trust-recipe if you trust this directory "
                 + ("(it runs exactly the file named here, if its sha256 is the one in patch.json)" if found else ""))
    if spec.kind == "file":
        want = m.get("sha256")
        if want and sha256_file(found) != want:
            raise CheckpointError(f"model file {found} changed since it was patched (sha256 differs from "
                                  f"{out / RECIPE_FILE}); nothing was run",
                                  hint=f"pass --model {found}:{spec.attr} to use it as it is now")
        spec.target = found
    if entry is not None:
        _check_pins(entry, found if spec.kind == "file" else _module_file(spec.target), out / RECIPE_FILE)
    return spec


def check_patched(out_dir: str | os.PathLike[str], *, model: Any = None, args: Any = None, trust: bool = False,
                  verify_hash: bool = True) -> tuple[PatchRecipe, Any]:
    """Everything :func:`load_patched` checks before it builds anything: the recipe read, the
    weights file present (and its sha256 the recorded one with ``verify_hash``), the model spec
    parsed (``model`` a spec string / ``load.ModelSpec``) or allowed by the trust rules
    (:func:`recipe_model_spec`). Returns ``(recipe, spec)`` (``spec`` is None when ``model`` is
    an ``nn.Module``). Raises ``UntrustedRecipeError``, ``CheckpointError``, ``UsageError``."""
    from .load import ModelSpec, coerce_args, parse_model_spec

    out = Path(out_dir)
    recipe = read_recipe(out)
    weights = out / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found", hint="the directory is incomplete; re-run bnnshift patch")
    expected = (recipe.hashes or {}).get("model.safetensors")
    if verify_hash and expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights} does not match the sha256 recorded in patch.json",
                              hint="the weights were replaced outside bnnshift: re-run `bnnshift patch ... -o DIR "
                                   "--force` (library: load_patched(dir, verify_hash=False))")
    if isinstance(model, nn.Module):
        return recipe, None
    if model is not None:
        spec = model if isinstance(model, ModelSpec) else parse_model_spec(str(model))
        if args is not None or not spec.args:
            spec.args = coerce_args(args) if args is not None else dict(recipe.factory_args)
        return recipe, spec
    return recipe, recipe_model_spec(recipe, out, trust=trust)


def load_patched(out_dir: str | os.PathLike[str], *, model: Any = None, args: Any = None, trust: bool = False,
                 device: str | torch.device = "cpu", verify_hash: bool = True) -> nn.Module:
    """Rebuild a patched model written by ``save_patched`` / ``bnnshift patch`` (eval mode).

    ``model``: None (rebuild from the recipe's spec, subject to the trust rules of
    :func:`recipe_model_spec`), a spec string / ``load.ModelSpec`` named by the user (built with
    ``args``, default the recipe's factory arguments), or an ``nn.Module`` instance of the same
    architecture (used in place). Never downloads. The unfolded sites are applied (the weights
    already hold the folded BN biases), then ``model.safetensors`` is loaded strictly
    (safetensors only: no unpickling). ``verify_hash`` checks the weights against the sha256 in
    ``patch.json``. Raises ``UntrustedRecipeError``, ``CheckpointError``, ``UsageError``.

    After fine-tuning the loaded model, re-estimate its BatchNorm statistics before evaluating,
    saving or exporting (the running averages lag behind the weights; docs/finetune.md)::

        model = load_patched("OUT/")
        train(model)                                          # your loop
        bnnshift.recalibrate_bn(model, loader, max_batches=20)
        save_patched(model, read_recipe("OUT/"), "OUT_ft/")
    """
    from .load import build_model, load_checkpoint, unwrap_model

    recipe, spec = check_patched(out_dir, model=model, args=args, trust=trust, verify_hash=verify_hash)
    weights = Path(out_dir) / WEIGHTS_FILE
    net = unwrap_model(model)[0] if isinstance(model, nn.Module) else build_model(spec)
    apply_recipe(net, recipe, include_folded=False)
    load_checkpoint(net, weights, strict=True)
    net.to(device)
    net.eval()
    return net


def thresholds_summary(model: nn.Module) -> dict[str, list[float] | float]:
    """Site name -> current threshold (float, or list for per-channel) of a patched model."""
    out: dict[str, Any] = {}
    for k, t in get_thresholds(model).items():
        t = t.detach().cpu()
        out[k] = float(t) if t.dim() == 0 else [float(v) for v in t]
    return out


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One row per site of a patched model: name, kind, shift, applied, threshold key, fold reason."""
    st = patch_state(model)
    if st is None:
        return []
    live = {s.name for s in shifted_sites(model)}
    rows = []
    for s in st.sites + st.hardtanh_sites:
        shift = st.shifts.get(s.name, st.hardtanh_shifts.get(s.name))
        folded = st.folded.get(s.name)
        rows.append({"name": s.name, "kind": s.kind, "op": s.op, "shift": shift,
                     "applied": f"folded into {folded}" if folded else (s.apply if s.name in live else "none"),
                     "threshold_key": None if folded else threshold_key(s),
                     "foldable": s.foldable, "fold_reason": s.fold_reason})
    return rows
