"""Tiling (anomaly_core/detectors/tiling.py): exact stitching, any detector through its tiles, the
artifact's round trip."""

import numpy as np
import pytest
import torch

from anomaly_core.detectors import build_detector
from anomaly_core.detectors.base import AnomalyOutput, Detector, DetectorConfig
from anomaly_core.detectors.tiling import TiledDetector, Tiling, cut, input_size
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.calibration import Calibration
from anomaly_core.scoring.scorer import Scorer
from anomaly_core.training.fit import fit
from tests.helpers import TensorImages


class TileMaps(Detector):
    """A stand-in whose map of a tile is the tile's first channel, or with `numbered` the
    tile's number in the order the tiled detector runs them: what stitching puts back."""

    name, family = "tile_maps", "memory"

    def __init__(self, image_size: int, numbered: bool = False) -> None:
        super().__init__(DetectorConfig(image_size=image_size))
        self.numbered, self.seen = numbered, 0

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        maps = images[:, 0]
        if self.numbered:
            numbers = torch.arange(self.seen, self.seen + len(images), dtype=images.dtype)
            maps = numbers.view(-1, 1, 1).expand_as(maps)
        self.seen += len(images)
        return AnomalyOutput(score=maps.amax(dim=(1, 2)), map=maps)


def test_tiles_cut_from_a_map_stitch_back_to_it_exactly_with_overlap():
    tiling = Tiling(size=(96, 160), tile=32, stride=16, batch=7)
    full = torch.rand(96, 160)
    assert len(tiling.origins) == 5 * 9
    out = TiledDetector(TileMaps(32), tiling)(full[None, None].expand(1, 3, 96, 160))
    assert torch.equal(out.map[0], full)


def test_overlapping_tiles_are_averaged_and_maps_at_another_scale_land_on_their_pixels():
    tiling = Tiling(size=(64, 64), tile=32, stride=16)  # 3 x 3 tiles, maps of 8 x 8 (scale 1/4)
    values = torch.arange(9, dtype=torch.float32)
    stitched = TiledDetector(TileMaps(8, numbered=True), tiling)(torch.rand(1, 3, 64, 64)).map[0]
    expected = torch.zeros(16, 16)
    count = torch.zeros(16, 16)
    for v, (y, x) in zip(values, tiling.origins):  # brute force, pixel by pixel
        for i in range(y // 4, y // 4 + 8):
            for j in range(x // 4, x // 4 + 8):
                expected[i, j] += v
                count[i, j] += 1
    assert stitched.shape == (16, 16) and torch.allclose(stitched, expected / count)
    assert stitched[0, 0] == 0 and stitched[15, 15] == 8  # corners: one tile each
    assert stitched[6, 6] == (0 + 1 + 3 + 4) / 4  # four tiles overlap there


@pytest.mark.parametrize("fields, says", [
    (dict(size=(100, 64), tile=32, stride=16), "not a multiple of the stride"),
    (dict(size=(64, 64), tile=128), "shorter side"),
    (dict(size=(64, 64), tile=32, stride=48), "between 1 and the tile"),
])
def test_a_tiling_that_does_not_cover_the_image_is_refused_with_a_fix(fields, says):
    with pytest.raises(ValueError, match=says):
        Tiling(**fields)


@pytest.fixture(scope="module")
def tiled_padim():
    torch.manual_seed(0)
    inner = build_detector("padim", backbone="resnet18", weights="random", image_size=32)
    detector = TiledDetector(inner, Tiling(size=(64, 96), tile=32, stride=32, batch=5))
    fit(detector, TensorImages(torch.rand(4, 3, 64, 96)), batch_size=2)
    return detector


def test_a_tiled_detector_scores_each_tile_and_takes_the_highest(tiled_padim):
    images = (torch.rand(2, 3, 64, 96) * 255).round().to(torch.uint8)
    with torch.no_grad():
        out = tiled_padim(images)
        floats = tiled_padim(images.float() / 255)
        tiles = cut(images.float() / 255, tiled_padim.tiling, [(1, i) for i in range(6)])
        alone = tiled_padim.detector(tiles)
    assert out.map.shape == (2, 64, 96) and torch.allclose(out.score, floats.score)
    assert torch.isclose(out.score[1], alone.score.max())
    assert torch.allclose(out.map[1, 32:64, 64:96], alone.map[5])  # the last tile, in place


def test_tiles_made_float_a_few_at_a_time_score_as_all_at_once(tiled_padim, monkeypatch):
    import anomaly_core.detectors.tiling as tiling_module

    images = (torch.rand(2, 3, 64, 96) * 255).round().to(torch.uint8)
    with torch.no_grad():
        at_once = tiled_padim(images)
        monkeypatch.setattr(tiling_module, "FLOAT_TILE_PIXELS", 2 * 32 * 32)  # 2 tiles a chunk
        chunked = tiled_padim(images)
    assert torch.equal(at_once.score, chunked.score) and torch.equal(at_once.map, chunked.map)


def test_the_artifact_records_the_tiling_and_scores_the_same_after_loading(tiled_padim, tmp_path):
    import json

    artifact = ModelArtifact(tiled_padim, Calibration(1.0, 1.0, 0.0, 2.0, "test"))
    artifact.save(str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["tiling"] == {"size": [64, 96], "tile": 32, "stride": 32, "batch": 5,
                              "positions": "shared"}
    assert meta["input_size"] == [64, 96]
    loaded = ModelArtifact.load(str(tmp_path / "m"))
    assert isinstance(loaded.detector, TiledDetector) and input_size(loaded.detector) == (64, 96)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 96), dtype=np.uint8)
    a, b = Scorer(artifact)(images), Scorer(loaded)(images)
    assert torch.equal(a.score, b.score) and torch.equal(a.map, b.map)


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_own_positions_fit_each_tile_position_alone_and_share_the_backbone(name, tmp_path):
    torch.manual_seed(0)
    options = dict(backbone="resnet18", weights="random", image_size=32)
    tiling = Tiling(size=(64, 96), tile=32, batch=4, positions="own")
    detector = TiledDetector(build_detector(name, **options), tiling)
    images = torch.rand(5, 3, 64, 96)
    fit(detector, TensorImages(images), batch_size=2)
    # Position 4 (second row, middle) against the same detector fitted on that position's tiles
    torch.manual_seed(0)
    alone = build_detector(name, **options)
    fit(alone, TensorImages(cut(images, tiling, [(b, 4) for b in range(5)])), batch_size=2)
    test = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = detector(test)
        expected = alone(cut(test, tiling, [(b, 4) for b in range(2)]))
    assert torch.allclose(out.map[:, 32:64, 32:64], expected.map, atol=1e-5)
    names = detector.detector.statistics
    first, last = (getattr(detector.position_stats[i], names[0]) for i in (0, 5))
    assert first.numel() and not torch.equal(first, last)  # each position its own statistics
    assert detector.fit_stats["positions"] == 6

    artifact = ModelArtifact(detector, Calibration(1.0, 1.0, 0.0, 2.0, "test"))
    artifact.save(str(tmp_path / "m"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    backbone = [k for k in keys if "backbone" in k]
    assert backbone and all(k.startswith("detector.backbone.") for k in backbone)  # once
    assert sum(k.startswith("position_stats.") for k in keys) == 6 * len(names)
    loaded = ModelArtifact.load(str(tmp_path / "m"))
    assert loaded.detector.tiling.positions == "own"
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 96), dtype=np.uint8)
    a, b = Scorer(artifact)(images), Scorer(loaded)(images)
    assert torch.equal(a.score, b.score) and torch.equal(a.map, b.map)


def test_own_positions_are_refused_for_a_detector_that_learns_one_network():
    tiling = Tiling(size=(64, 64), tile=32, positions="own")
    with pytest.raises(ValueError, match="use tile positions 'shared'.*padim, patchcore, vit_knn"):
        TiledDetector(build_detector("autoencoder", image_size=32), tiling)
    with pytest.raises(ValueError, match="choose one of shared, own"):
        Tiling(size=(64, 64), tile=32, positions="each")


@pytest.mark.parametrize("source, size", [((400, 600), (800, 1200)), ((2048, 2048), (1000, 1000)),
                                          ((300, 300), (1000, 999)), ((96, 144), (96, 144))])
def test_large_masks_rendered_in_strips_match_the_whole_map_rendered_at_once(source, size,
                                                                            monkeypatch):
    from anomaly_core.scoring import scorer as scoring

    maps = torch.rand(1, *source) * 2
    calibration = Calibration(1.0, 1.0, 0.0, 2.0, "test")
    whole = scoring.render_maps(maps, [size], calibration)
    monkeypatch.setattr(scoring, "STRIP_PIXELS", 0)
    monkeypatch.setattr(scoring, "STRIP_ROWS", 64)
    strips = scoring.render_maps(maps, [size], calibration)
    (mask, heat), (strip_mask, strip_heat) = ([m[0] for m in r] for r in (whole, strips))
    assert mask.shape == heat.shape == strip_mask.shape == strip_heat.shape == size
    # equal but for float rounding that crosses the threshold or a quantization step, rarely
    assert (mask != strip_mask).mean() < 1e-4
    assert np.abs(heat.astype(int) - strip_heat).max() <= 1 and (heat != strip_heat).mean() < 1e-3


def test_an_8000_px_mask_and_heatmap_render_without_a_float_copy_of_the_whole_map():
    # Peak memory of rendering a 4,000 px map to 8,000 x 8,000: the uint8 mask and heatmap
    # (61 MiB each) and a strip of floats, not the 244 MiB float map and its temporaries.
    import subprocess
    import sys

    code = """
import resource, torch
from anomaly_core.model.calibration import Calibration
from anomaly_core.scoring.scorer import render_maps
maps = torch.rand(1, 4000, 4000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
masks, heats = render_maps(maps, [(8000, 8000)], Calibration(1.0, 1.0, 0.0, 2.0, "test"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024, masks[0].shape, heats[0].shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    grown_mib = int(out[0])
    assert " ".join(out[1:]) == "(8000, 8000) (8000, 8000)"
    assert grown_mib < 300, grown_mib  # measured 156 MiB in strips, 799 MiB all at once
