"""Tiled detection for high-resolution images: any detector, fitted on and applied to tiles.

An image is resized to the tiling's working size (height, width), cut into square tiles of
`tile` pixels every `stride` pixels (stride < tile: overlapping tiles), and each tile, resized to
the detector's `image_size`, goes through the detector like a whole image would. The tiles'
maps are put back where their tiles came from, averaged where tiles overlap, into one map of
the working size times `image_size / tile`; the image's score is the highest tile score.
Training observes (memory detectors) or trains on (gradient detectors) the tiles of the
training images. By default one model serves every tile position (`positions="shared"`: a
texture, a PatchCore bank of every tile). With `positions="own"` a memory detector keeps its
statistics (`Detector.statistics`: PaDiM's Gaussians, PatchCore's bank, ViT-kNN's banks) per
tile position, sharing the frozen backbone: for aligned parts, where what is normal depends on
where in the image it is (a component in the wrong place is made of normal-looking pixels).
Gradient detectors learn one network for all positions.

Memory: tiles are cut from the image as it is (uint8 when it comes from the scoring job) and
become floats a model batch (`batch` tiles) at a time, so an image never holds all its tiles
as float tensors, and each batch's maps are added into the stitched map as they come: the
stitched map (at the working size times image_size / tile) is the one float map per image.

The artifact records the tiling (model.json "tiling"); scoring applies the same.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.data.datasets import to_unit_float
from anomaly_core.detectors.base import AnomalyOutput, Detector

POSITIONS = ("shared", "own")
FLOAT_TILE_PIXELS = 1 << 22  # tile pixels made float at once, before resizing to the model's


@dataclass(frozen=True)
class Tiling:
    """How images are tiled: working size (height, width), tile side and stride in its pixels,
    how many tiles go through the model at once, and whether every tile position shares one
    model ("shared") or has its own statistics ("own")."""

    size: tuple[int, int]
    tile: int
    stride: int | None = None  # None: the tile (no overlap)
    batch: int = 64
    positions: str = "shared"

    def __post_init__(self) -> None:
        height, width = (int(v) for v in self.size)
        object.__setattr__(self, "size", (height, width))
        stride = self.tile if self.stride is None else int(self.stride)
        object.__setattr__(self, "stride", stride)
        if not 0 < self.tile <= min(height, width):
            raise ValueError(f"tile {self.tile} must be between 1 and the working size's shorter "
                             f"side ({min(height, width)}); pass a smaller --tile")
        if not 0 < stride <= self.tile:
            raise ValueError(f"tile stride {stride} must be between 1 and the tile ({self.tile})")
        for side, name in ((height, "height"), (width, "width")):
            if (side - self.tile) % stride:
                raise ValueError(
                    f"working {name} {side} minus the tile {self.tile} is not a multiple of the "
                    f"stride {stride}, so the tiles would not end at the edge; e.g. use a "
                    f"{name} of {self.tile + stride * round((side - self.tile) / stride)}")
        if self.batch < 1:
            raise ValueError("tile batch must be at least 1")
        if self.positions not in POSITIONS:
            raise ValueError(f"tile positions {self.positions!r}: choose one of "
                             f"{', '.join(POSITIONS)}")

    @cached_property
    def origins(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        height, width = self.size
        return [(y, x) for y in range(0, height - self.tile + 1, self.stride)
                for x in range(0, width - self.tile + 1, self.stride)]

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "tile": self.tile, "stride": self.stride,
                "batch": self.batch, "positions": self.positions}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Tiling:
        return cls(size=tuple(fields["size"]), tile=int(fields["tile"]),
                   stride=fields.get("stride"), batch=int(fields.get("batch", 64)),
                   positions=fields.get("positions", "shared"))


def check_model_size(tiling: Tiling, model_size: int) -> None:
    """Tile maps (at the detector's image_size) must land on whole pixels of the stitched map."""
    if (tiling.stride * model_size) % tiling.tile:
        raise ValueError(f"tile stride {tiling.stride} times the detector's image_size {model_size} "
                         f"must be a multiple of the tile {tiling.tile}, so tile maps land on "
                         "whole pixels of the stitched map; e.g. a stride of half the tile, or "
                         "image_size equal to the tile")


def check_positions(tiling: Tiling, detector: type[Detector]) -> None:
    """Per-position statistics need a detector that has statistics (the memory family)."""
    if tiling.positions == "own" and not detector.statistics:
        from anomaly_core.detectors import detector_class, list_detectors

        with_stats = [n for n in list_detectors() if detector_class(n).statistics]
        raise ValueError(
            f"{detector.name} learns one network for every tile position, so its tiles share it: "
            f"use tile positions 'shared'; per-position statistics ('own') are for "
            f"{', '.join(with_stats)}")


def cut(images: torch.Tensor, tiling: Tiling, which: list[tuple[int, int]]) -> torch.Tensor:
    """Tiles [len(which),3,tile,tile] for (image index, tile index) pairs, same dtype."""
    origins, t = tiling.origins, tiling.tile
    return torch.stack([images[b, :, y:y + t, x:x + t]
                        for b, (y, x) in ((b, origins[i]) for b, i in which)])


def add_tiles(total: torch.Tensor, maps: torch.Tensor, tiling: Tiling,
              which: list[tuple[int, int]]) -> None:
    """Add tile maps [n,m,m] for (image index, tile index) pairs into their images' places in
    `total` [B, H*m/tile, W*m/tile]: stitching a batch as it comes, no tensor of all tiles."""
    m = maps.shape[-1]
    scale = m / tiling.tile
    origins = tiling.origins
    for tile_map, (b, i) in zip(maps, which):
        top, left = (round(v * scale) for v in origins[i])
        total[b, top:top + m, left:left + m] += tile_map


def coverage(tiling: Tiling, m: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many tiles (maps of m pixels) cover each row [H',1] and each column [1,W'] of the
    stitched map: the tiles are a grid, so a pixel's count is its row's times its column's
    (never a full-size count map)."""
    scale = m / tiling.tile
    counts = []
    for side in tiling.size:
        count = like.new_zeros(round(side * scale))
        for start in range(0, side - tiling.tile + 1, tiling.stride):
            count[round(start * scale):round(start * scale) + m] += 1
        counts.append(count)
    return counts[0][:, None], counts[1][None, :]


def _with_buffers(detector: Detector, buffers: dict[str, torch.Tensor]) -> Detector:
    """A shallow copy of `detector` holding `buffers` in place of its own: it shares every
    submodule (the frozen backbone) and parameter; its plain attributes (fit accumulators)
    become its own as it assigns them. Thread-safe for forward: nothing shared is changed."""
    clone = copy.copy(detector)
    clone._parameters = dict(detector._parameters)
    clone._buffers = {**detector._buffers, **buffers}
    clone._modules = dict(detector._modules)
    return clone


class _Statistics(nn.Module):
    """One tile position's statistics: the detector's `statistics` buffers, empty until fitted
    or loaded (load_weights sizes them from the artifact)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        for name in detector.statistics:
            self.register_buffer(name, detector._buffers[name].new_zeros(detector._buffers[name].shape))


def _total(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-position fit_stats summed (flags: any), with the number of positions."""
    out: dict[str, Any] = {"positions": len(stats)}
    for key in stats[0] if stats else ():
        values = [s.get(key) for s in stats]
        if all(isinstance(v, bool) for v in values):
            out[key] = any(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
    return out


class TiledDetector(Detector):
    """A detector applied tile by tile to images at the tiling's working size. Its `forward`
    takes float images in [0,1] or uint8 images [B,3,H,W] (`takes_uint8`: the Scorer passes
    uint8 as decoded, and tiles become floats a model batch at a time)."""

    takes_uint8 = True

    def __init__(self, detector: Detector, tiling: Tiling) -> None:
        super().__init__(detector.config)
        check_model_size(tiling, detector.config.image_size)
        check_positions(tiling, type(detector))
        self.detector = detector
        self.tiling = tiling
        self.name = detector.name
        self.family = detector.family
        self.frozen = detector.frozen
        self.gpu_precision = detector.gpu_precision
        if tiling.positions == "own":
            # One set of statistics per tile position; the backbone stays the detector's, once.
            self.position_stats = nn.ModuleList(_Statistics(detector) for _ in tiling.origins)
        self._fitting: list[Detector] | None = None  # per-position copies while observing

    @property
    def own_positions(self) -> bool:
        return self.tiling.positions == "own"

    @property
    def input_size(self) -> tuple[int, int]:
        return self.tiling.size

    @property
    def weight_source(self) -> str:
        return self.detector.weight_source

    @weight_source.setter
    def weight_source(self, value: str) -> None:
        self.detector.weight_source = value

    def config_dict(self) -> dict[str, Any]:
        return self.detector.config_dict()

    def check_fit_memory(self, device: torch.device) -> None:
        per = type(self.detector).fit_state_bytes(self.detector.config)
        if not self.own_positions or per is None:
            self.detector.check_fit_memory(device)
            return
        n = len(self.tiling.origins)
        try:
            self.detector.check_fit_memory(device, needed=per * n)
        except ValueError as exc:
            raise type(exc)(f"{exc}; or fewer tile positions (now {n}, each with its own "
                            "statistics: a larger tile or stride), or tile positions 'shared'"
                            ) from exc

    def _tiles(self, images: torch.Tensor):
        """(position or None, [(image, tile)], float tiles [n,3,m,m]) in model batches of at most
        `batch` tiles: any mix of positions when they share the model, one position per batch
        when each has its own statistics."""
        if tuple(images.shape[-2:]) != self.tiling.size:
            raise ValueError(f"tiled {self.name} takes images of {self.tiling.size} (height, "
                             f"width), got {tuple(images.shape[-2:])}")
        n_images, n_tiles, batch = images.shape[0], len(self.tiling.origins), self.tiling.batch
        if self.own_positions:
            groups = ((i, [(b, i) for b in range(start, min(start + batch, n_images))])
                      for i in range(n_tiles) for start in range(0, n_images, batch))
        else:
            every = [(b, i) for b in range(n_images) for i in range(n_tiles)]
            groups = ((None, every[start:start + batch]) for start in range(0, len(every), batch))
        m = self.config.image_size
        # Tiles larger than the model's input become floats a few at a time before they shrink:
        # 32 float tiles of 1,024 px would be 384 MB, FLOAT_TILE_PIXELS bounds it to 48 MB.
        chunk = max(1, FLOAT_TILE_PIXELS // self.tiling.tile ** 2)
        for position, pairs in groups:
            parts = []
            for start in range(0, len(pairs), chunk):
                tiles = cut(images, self.tiling, pairs[start:start + chunk])
                tiles = to_unit_float(tiles) if tiles.dtype == torch.uint8 else tiles
                if tiles.shape[-1] != m:
                    tiles = F.interpolate(tiles, size=(m, m), mode="bilinear",
                                          align_corners=False, antialias=True)
                parts.append(tiles)
            yield position, pairs, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _at(self, position: int | None) -> Detector:
        """The detector as it scores tiles at `position` (None: the shared one)."""
        if position is None:
            return self.detector
        return _with_buffers(self.detector, dict(self.position_stats[position]._buffers))

    # memory family: every tile is a training image (of its position's statistics when own)
    def observe(self, images: torch.Tensor) -> None:
        if self.own_positions and self._fitting is None:
            self._fitting = [_with_buffers(self.detector, {}) for _ in self.tiling.origins]
        for position, _, tiles in self._tiles(images):
            (self.detector if position is None else self._fitting[position]).observe(tiles)

    def finalize(self) -> None:
        if not self.own_positions:
            self.detector.finalize()
            return
        # No images observed: each position's finalize says so as the detector does.
        fitting = self._fitting or [_with_buffers(self.detector, {}) for _ in self.tiling.origins]
        self._fitting = None
        stats = []
        for position, model in enumerate(fitting):  # same order on every rank (collectives)
            model.finalize()
            for name in self.detector.statistics:
                setattr(self.position_stats[position], name, model._buffers[name])
            stats.append(getattr(model, "fit_stats", {}))
            fitting[position] = None  # its accumulators go as soon as it is done
        self.fit_stats = _total(stats)

    # gradient family: one step over the tiles of the batch (a model batch of tiles at a time
    # would change the optimizer's step count with the tiling; the batch's tiles in one step
    # keep "a step per batch of images")
    def training_step(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.training_step(torch.cat([t for _, _, t in self._tiles(images)]))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.detector.optimizers()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        # Each model batch's maps are added into place as they come: with overlapping tiles
        # all tile maps at once would be (tile / stride)^2 times the stitched map.
        scores = total = None
        for position, pairs, tiles in self._tiles(images):
            out = self._at(position)(tiles)
            if total is None:
                rows, cols = coverage(self.tiling, out.map.shape[-1], out.map)
                scores = out.score.new_empty(images.shape[0], len(self.tiling.origins))
                total = out.map.new_zeros(images.shape[0], len(rows), cols.shape[1])
            which = torch.tensor(pairs, device=out.score.device).T
            scores[which[0], which[1]] = out.score
            add_tiles(total, out.map, self.tiling, pairs)
        return AnomalyOutput(score=scores.amax(dim=1), map=total.div_(rows).div_(cols))

    # fit() and the jobs read these on any detector
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["detector"], name)


def tiling_of(detector: Detector) -> Tiling | None:
    return detector.tiling if isinstance(detector, TiledDetector) else None


def input_size(detector: Detector) -> tuple[int, int]:
    """(height, width) of the images a detector takes: the working size when tiled."""
    if isinstance(detector, TiledDetector):
        return detector.tiling.size
    return (detector.config.image_size,) * 2


def map_size(detector: Detector) -> tuple[int, int]:
    """(height, width) of the maps a detector outputs: its input size, or the stitched map's."""
    if isinstance(detector, TiledDetector):
        scale = detector.config.image_size / detector.tiling.tile
        return tuple(round(s * scale) for s in detector.tiling.size)
    return input_size(detector)


def tiled(detector: Detector, tiling: dict[str, Any] | Tiling | None) -> Detector:
    """`detector` tiled as `tiling` says (a Tiling or its dict), or as it is for None."""
    if tiling is None:
        return detector
    return TiledDetector(detector, tiling if isinstance(tiling, Tiling) else Tiling.from_dict(tiling))


