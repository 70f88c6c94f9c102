"""What the jobs' Ray workers and actors receive: frozen dataclasses, each built from the job's
flags in one place (`from_args`), documented by their fields. No torch here: drivers import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomaly_core.data.datasets import ImageRecord
    from anomaly_core.detectors.tiling import Tiling


@dataclass(frozen=True)
class ScoringConfig:
    """The scoring pipeline's settings, for its read tasks, model actors and row tasks."""

    # product -> (artifact URI, (height, width) its images are decoded to): one product for a
    # single model, every product with a model for a fleet run (--fleet)
    models: dict[str, tuple[str, tuple[int, int]]]
    use_gpu: bool = False
    precision: str = "auto"  # the networks' precision: auto, fp32, fp16 or bf16
    compile: bool = False  # torch.compile the model in each actor
    render_on_device: bool = False  # masks and heatmaps rendered by the model actor
    mask_size: tuple[int, int] | None = None  # (height, width) of masks; None: each image's
    heatmaps: str = "anomalous"  # rows with a heatmap PNG: all, anomalous or none
    model_threads: int | None = None  # CPU only: each actor's torch threads; None: Ray's
    max_pixels: int = 100_000_000  # larger images are refused (decompression bombs)
    keep_jpeg: bool = False  # plain JPEGs left for the model actor to decode (--gpu-decode)
    resize_on_device: bool = False  # images shipped at decoded size, resized by the model actor
    # the models an actor keeps loaded at once, in MiB of weights (least recently used evicted
    # first); one model is always kept, whatever its size
    models_memory_mb: float = 8192

    @classmethod
    def from_args(cls, args: Any, models: dict[str, tuple[str, tuple[int, int]]]
                  ) -> ScoringConfig:
        """From jobs.score's parsed flags and each product's artifact and input size."""
        return cls(
            models={p: (uri, tuple(size)) for p, (uri, size) in models.items()},
            use_gpu=args.use_gpu, precision=args.precision, compile=args.compile,
            render_on_device=args.render_on_device,
            mask_size=tuple(args.mask_size) if args.mask_size else None,
            heatmaps=args.heatmaps,
            model_threads=args.model_threads, max_pixels=args.max_pixels,
            keep_jpeg=args.gpu_decode, resize_on_device=args.resize_on_device,
            models_memory_mb=args.models_memory_mb,
        )

    @property
    def input_sizes(self) -> dict[str, tuple[int, int]]:
        """product -> (height, width) its images are decoded to."""
        return {p: size for p, (_, size) in self.models.items()}


@dataclass(frozen=True)
class TrainingConfig:
    """One training run, as every rank of it receives it (anomaly_core.training.train)."""

    detector: str  # registered detector name
    options: dict[str, Any]  # the detector's full config (every option, defaults filled in)
    output: str | None  # artifact folder to write; None trains and validates only (a sweep)
    train: tuple[ImageRecord, ...] = field(repr=False)  # the images fit() learns from
    val: tuple[ImageRecord, ...] = field(repr=False)  # held out: calibration and objective
    objective: dict[str, float] = field(default_factory=lambda: {"image_auroc": 1.0})
    batch_size: int = 16
    epochs: int = 1  # gradient detectors' epochs
    loader_workers: int = 0  # DataLoader processes per rank
    seed: int = 0
    precision: str = "fp32"  # fp32, or bf16 autocast
    channels_last: bool = False
    use_gpu: bool = False
    input_pipeline: str = "loader"  # loader: each rank decodes; ray-data: a stream of shards
    tiling: Tiling | None = None  # fit on tiles of a working size (high-resolution images)

    @classmethod
    def from_args(cls, args: Any, detector: str, options: dict[str, Any],
                  train: list[ImageRecord], val: list[ImageRecord],
                  output: str | None) -> TrainingConfig:
        """From jobs.train's (or jobs.tune's) parsed flags, the detector with its options and
        the split records; fails on a tiling the flags or the detector cannot have."""
        from anomaly_core.training.validation import parse_objective

        tiling = _tiling(args, detector, options)
        return cls(
            detector=detector, options=dict(options), output=output,
            train=tuple(train), val=tuple(val), objective=parse_objective(args.objective),
            batch_size=args.batch_size, epochs=args.epochs, loader_workers=args.loader_workers,
            seed=args.seed, precision=args.precision, channels_last=args.channels_last,
            use_gpu=args.use_gpu, input_pipeline=args.input_pipeline, tiling=tiling,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) training images are decoded to: the tiling's working size, else
        the detector's input."""
        if self.tiling is not None:
            return tuple(self.tiling.size)
        from anomaly_core.detectors import make_config

        return (make_config(self.detector, **self.options).image_size,) * 2


def _tiling(args: Any, detector: str, options: dict[str, Any]) -> Tiling | None:
    """--tile, --tiled-size, --tile-stride, --tile-batch and --tile-positions as a Tiling."""
    if bool(args.tile) != bool(args.tiled_size):
        raise ValueError("--tile and --tiled-size go together: the tile side and the working "
                         "size (height width) images are resized to, e.g. --tiled-size 2048 2048 "
                         "--tile 256")
    if args.tile_positions != "shared" and not args.tile:
        raise ValueError(f"--tile-positions {args.tile_positions} needs --tile and --tiled-size")
    if not args.tile:
        return None
    from anomaly_core.detectors import detector_class, make_config
    from anomaly_core.detectors.tiling import Tiling, check_model_size, check_positions

    tiling = Tiling(size=tuple(args.tiled_size), tile=args.tile, stride=args.tile_stride,
                    batch=args.tile_batch, positions=args.tile_positions)
    check_model_size(tiling, make_config(detector, **options).image_size)
    check_positions(tiling, detector_class(detector))
    return tiling


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values parsed as JSON when they can be (numbers, lists, bools)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected key=value, e.g. --set image_size=128")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
