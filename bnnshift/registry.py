"""Registries for what plugins contribute: zoo models, detectors, leaf modules, data sets.

Plugins (first- or third-party) are found through the ``bnnshift.plugins`` entry-point
group; each entry point is a callable ``register(api)`` that receives this module and calls
the ``register_*`` functions below. Registering a name twice warns and keeps the newest.
"""
from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "bnnshift.plugins"


class Registry(Generic[T]):
    """A name -> object mapping that warns on overwrite (timm ``register_model`` style)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._items and self._items[name] is not obj:
            warnings.warn(f"bnnshift: {self.kind} {name!r} registered twice; keeping the newest", stacklevel=3)
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(name) from None

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        load_plugins()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


@dataclass
class ZooEntry:
    """A built-in model: ``factory(**kwargs) -> nn.Module`` and what scan must find in it."""

    name: str
    factory: Callable[..., Any]
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28)
    num_classes: int = 10
    activation_sites: int | None = None  # expected number of activation call sites
    weight_binarizers: int | None = None  # expected number of weight binarizers
    description: str = ""
    style: str = ""  # which binarizer style it exercises
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Detector:
    """Teaches scan a binarizer it cannot recognise by itself.

    ``module_types``: classes whose forward binarizes its (first) input (treated as leaves,
    each call is one site). ``class_names``: class names of public families' binarizer modules
    (``BinaryActivation``, ``RSign``...), matched without importing the user's code.

    ``functions`` and ``alphabet`` were never read (an ``autograd.Function`` that binarizes and
    the output alphabet are found by their values): still accepted, ignored with a
    ``DeprecationWarning``; they will be removed.
    """

    name: str
    module_types: tuple[type, ...] = ()
    functions: InitVar[tuple[type, ...] | None] = None
    class_names: tuple[str, ...] = ()  # match user classes by name (public BNN families)
    alphabet: InitVar[str | None] = None
    description: str = ""

    def __post_init__(self, functions, alphabet) -> None:
        given = [n for n, v in (("functions", functions), ("alphabet", alphabet)) if v]
        if given:
            warnings.warn(f"bnnshift: Detector({self.name!r}): {' and '.join(given)} are ignored (binarizing "
                          "Functions and alphabets are found by their values) and will be removed",
                          DeprecationWarning, stacklevel=3)


# the InitVars' defaults stay behind as class attributes: reading d.functions must fail, not give None
del Detector.functions, Detector.alphabet


ZOO: Registry[ZooEntry] = Registry("zoo model")
DETECTORS: Registry[Detector] = Registry("detector")
LEAF_MODULES: Registry[type] = Registry("leaf module")
DATASETS: Registry[Callable[..., Any]] = Registry("data set")


def register_zoo_model(name: str, factory: Callable[..., Any] | None = None, **meta: Any):
    """Register ``factory`` as ``zoo:name``; usable as a decorator."""

    def deco(f: Callable[..., Any]):
        ZOO.register(name, ZooEntry(name=name, factory=f, **meta))
        return f

    return deco(factory) if factory is not None else deco


def register_detector(detector: Detector) -> Detector:
    return DETECTORS.register(detector.name, detector)


def register_leaf_module(cls: type) -> type:
    """Never trace into ``cls`` (e.g. a module whose forward has data-dependent control flow)."""
    return LEAF_MODULES.register(f"{cls.__module__}.{cls.__qualname__}", cls)


def register_dataset(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    return DATASETS.register(name, factory)


_loaded = False


def load_plugins() -> None:
    """Import every ``bnnshift.plugins`` entry point once; a broken plugin warns, never crashes."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points
    import sys

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            hook = ep.load()
            if callable(hook):
                hook(sys.modules[__name__])
        except Exception as exc:  # a third-party plugin must not take the CLI down
            warnings.warn(f"bnnshift: plugin {ep.name!r} failed to load: {exc}", stacklevel=2)


def binarizer_module_types() -> tuple[type, ...]:
    out: list[type] = []
    for _, d in DETECTORS.items():
        out.extend(d.module_types)
    return tuple(out)
