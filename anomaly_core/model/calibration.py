"""Calibration: thresholds and normalization windows as an artifact stores them (model.json).
numpy only, so drivers and row tasks read it without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Calibration:
    """Thresholds and normalization windows, one set per quantity: image scores and map pixels.

    `normalize` maps a quantity's threshold to 0.5 and its validation window [min, max] onto a
    unit-wide range, clipped to [0, 1]. Artifacts from before per-quantity calibration have no
    pixel window (pixel_min None): their maps keep the image window, as they were written.
    """

    threshold: float  # image score >= threshold: anomalous
    pixel_threshold: float  # map value >= pixel_threshold: in the mask
    min: float  # image scores: lowest held-out normal score
    max: float  # image scores: top of the window (see calibrate)
    method: str
    pixel_min: float | None = None  # map values: low end of held-out normal maps (1st percentile)
    pixel_max: float | None = None  # map values: top of the window (see calibrate)
    pixel_method: str = ""
    # Held-out normal image scores (at most evaluate.REFERENCE_SCORES quantiles): the distribution that
    # scores of a new day are compared with (a drift signal in the report).
    normal_scores: list[float] = field(default_factory=list)

    def window(self, pixel: bool = False) -> tuple[float, float]:
        """(threshold, span) of a quantity: what normalize maps to 0.5 and to a unit width."""
        if pixel and self.pixel_min is not None:
            t, low, high = self.pixel_threshold, self.pixel_min, self.pixel_max
        else:
            t, low, high = (self.pixel_threshold if pixel else self.threshold), self.min, self.max
        return t, max(high - low, 1e-12)

    def normalize(self, values: np.ndarray | float, pixel: bool = False) -> np.ndarray:
        """Threshold -> 0.5, the validation window -> a unit-wide range, clipped to [0, 1]."""
        t, span = self.window(pixel)
        return np.clip((np.asarray(values, dtype=np.float64) - t) / span + 0.5, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)
