"""Detector registry: `@register` on the class, `build_detector(name, **config)` to make one."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import pkgutil
from typing import Any

from anomaly_core.detectors.base import Detector, DetectorConfig

_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector buildable by its `name`."""
    if not cls.name or cls.family not in ("memory", "gradient"):
        raise TypeError(f"{cls.__name__} needs a name and family 'memory' or 'gradient'")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    # Every module in this package registers its detector on import; done on first lookup so
    # `import anomaly_core` stays light and a new detector needs no list to be edited.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def list_detectors(pattern: str = "*") -> list[str]:
    """Registered detector names matching a wildcard pattern."""
    _load_all()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def detector_class(name: str) -> type[Detector]:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; registered: {', '.join(list_detectors())}")
    return _REGISTRY[name]


def make_config(name: str, **fields: Any) -> DetectorConfig:
    """The detector's config with its documented defaults, overridden by `fields`."""
    cls = detector_class(name)
    known = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; its options: {sorted(known)}")
    # JSON and flags give lists where a config declares tuples.
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls.Config(**fields)


def build_detector(name: str, **fields: Any) -> Detector:
    """A detector by registry name with config overrides, e.g. build_detector("padim", backbone="resnet18")."""
    return detector_class(name)(make_config(name, **fields))


__all__ = [
    "build_detector",
    "detector_class",
    "list_detectors",
    "make_config",
    "register",
]
