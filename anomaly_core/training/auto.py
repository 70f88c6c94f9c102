"""`--detector auto`: fit a few candidate detectors (with their key settings) on a product's
good images and keep the one with the best label-free objective, the sweep's: image AUROC on
synthetic anomalies pasted into held-out normal images (anomaly_core.data.anomalies), or on
labelled validation defects when there are some."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Single-pass detectors: a candidate costs one pass over the images, not epochs.
DEFAULT_CANDIDATES = "padim;patchcore;patchcore:coreset_ratio=0.01"


@dataclass(frozen=True)
class Candidate:
    """One detector with the settings that differ from its defaults."""

    detector: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """e.g. patchcore-coreset_ratio-0.01: a folder name and part of an MLflow metric name
        (no '=' there)."""
        return "-".join([self.detector, *(f"{k}-{v}" for k, v in self.options)])


def parse_candidates(text: str) -> list[Candidate]:
    """'padim;patchcore:coreset_ratio=0.01,num_neighbors=3' -> candidates (checked options)."""
    from anomaly_core.config import parse_overrides
    from anomaly_core.detectors import make_config

    out = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        name, _, settings = part.partition(":")
        options = parse_overrides([s for s in settings.split(",") if s]) if settings else {}
        make_config(name, **options)  # an unknown detector or option fails here
        out.append(Candidate(name, tuple(sorted(options.items()))))
    if not out:
        raise ValueError("--auto-candidates: give at least one detector, e.g. padim;patchcore")
    return out


def objective(validation_metrics: dict[str, Any]) -> float | None:
    """A fit's label-free objective, as its artifact recorded it (higher is better)."""
    value = validation_metrics.get("objective", validation_metrics.get("val_image_auroc"))
    return float(value) if value is not None else None


def pick(results: list[tuple[Candidate, float | None]]) -> Candidate:
    """The candidate with the highest objective; the first listed wins a tie."""
    scored = [(c, v) for c, v in results if v is not None]
    if not scored:
        raise ValueError("no --detector auto candidate finished with an objective")
    return max(scored, key=lambda cv: cv[1])[0]
