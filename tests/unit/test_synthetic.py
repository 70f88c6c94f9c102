"""The procedural data set: deterministic, MVTec layout, honest masks, not solvable per pixel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly_core.data import synthetic

SIZE = 64
COUNTS = dict(n_train=20, n_test_good=8, n_test_defect=3)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(str(root), size=SIZE, seed=0, **COUNTS)
    return root


def test_offers_two_textures_two_objects_and_three_defects() -> None:
    kinds = list(synthetic.CATEGORIES.values())
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    assert set(kinds) == {"texture", "object"}
    assert len(set(synthetic.DEFECTS)) >= 3


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    dataset: Path, tmp_path: Path
) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    synthetic.generate(str(again), size=SIZE, seed=0, **COUNTS)
    synthetic.generate(str(other), size=SIZE, seed=1, **COUNTS)
    first, second, third = _files(dataset), _files(again), _files(other)
    assert first == second
    assert first.keys() == third.keys()
    assert all(first[k] != third[k] for k in first)


def test_a_category_is_the_same_whatever_else_is_generated(dataset: Path, tmp_path: Path) -> None:
    synthetic.generate(str(tmp_path), categories=["wood"], size=SIZE, seed=0, **COUNTS)
    assert _files(tmp_path / "wood") == _files(dataset / "wood")


def test_writes_mvtec_layout_with_a_mask_per_defect_image(dataset: Path) -> None:
    area = SIZE * SIZE
    for cat in synthetic.CATEGORIES:
        root = dataset / cat
        assert len(list((root / "train" / "good").glob("*.png"))) == COUNTS["n_train"]
        assert len(list((root / "test" / "good").glob("*.png"))) == COUNTS["n_test_good"]
        assert (root / "train" / "good" / "000.png").is_file()
        for defect in synthetic.DEFECTS:
            images = sorted((root / "test" / defect).glob("*.png"))
            names = [f"{i:03d}.png" for i in range(COUNTS["n_test_defect"])]
            assert [p.name for p in images] == names
            for path in images:
                with Image.open(path) as im:
                    assert im.mode == "RGB" and im.size == (SIZE, SIZE)
                mask_path = root / "ground_truth" / defect / f"{path.stem}_mask.png"
                with Image.open(mask_path) as im:
                    assert im.mode == "L" and im.size == (SIZE, SIZE)
                mask = _read(mask_path)
                assert set(np.unique(mask)) <= {0, 255}
                share = (mask > 0).sum() / area
                bounds = (synthetic.MIN_DEFECT_AREA, synthetic.MAX_DEFECT_AREA)
                assert bounds[0] <= share <= bounds[1], (mask_path, share)


@pytest.mark.parametrize("category", list(synthetic.CATEGORIES))
def test_add_defect_changes_only_masked_pixels_and_those_visibly(category: str) -> None:
    size = 96
    for i, defect in enumerate(synthetic.DEFECTS):
        rng = np.random.default_rng(i)
        good = synthetic.make_image(category, rng, size)
        bad, mask = synthetic.add_defect(good, defect, rng, category=category)
        assert bad.shape == good.shape and bad.dtype == np.uint8
        assert mask.dtype == bool and mask.shape == good.shape[:2]
        assert np.array_equal(bad[~mask], good[~mask])
        change = np.abs(bad.astype(float) - good)[mask].mean()
        # Measured 11-65 grey levels across categories, defects and sizes.
        assert change > 8, (defect, change)
        if synthetic.CATEGORIES[category] == "object":
            on_object = synthetic.object_region(good)
            assert mask[on_object].sum() == mask.sum(), f"{defect} left the {category}"


@pytest.mark.parametrize("category", [c for c, k in synthetic.CATEGORIES.items() if k == "object"])
def test_object_region_finds_the_drawn_object(category: str) -> None:
    for i in range(5):
        image, drawn = synthetic._render(category, np.random.default_rng(i), SIZE)
        found = synthetic.object_region(image)
        assert (found & drawn).sum() > 0.95 * drawn.sum()
        assert found.mean() < 0.6


def test_add_defect_rejects_an_unknown_defect() -> None:
    image = synthetic.make_image("wood", np.random.default_rng(0), SIZE)
    with pytest.raises(ValueError, match="dent"):
        synthetic.add_defect(image, "dent", np.random.default_rng(0))


def test_generate_rejects_an_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zebra"):
        synthetic.generate(str(tmp_path), categories=["zebra"])


def test_per_pixel_zscore_baseline_is_clearly_imperfect(dataset: Path) -> None:
    """Pose, light and noise beat a per-pixel model while the defects stay real."""
    aurocs, changes = {}, []
    for cat in synthetic.CATEGORIES:
        root = dataset / cat
        train = np.stack([_read(p) for p in sorted((root / "train" / "good").glob("*.png"))])
        mean, std = train.mean(0), train.std(0) + 1.0
        good = sorted((root / "test" / "good").glob("*.png"))
        bad = [p for d in synthetic.DEFECTS for p in sorted((root / "test" / d).glob("*.png"))]
        test = np.stack([_read(p) for p in good + bad]).astype(float)
        scores = np.abs((test - mean) / std).reshape(len(test), -1).max(1)
        labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
        aurocs[cat] = roc_auc_score(labels, scores)
        # The defect's strength, against the same image before it: regenerate it from its seed.
        for k, defect in enumerate(synthetic.DEFECTS, start=1):
            for i in range(COUNTS["n_test_defect"]):
                rng = synthetic._rng(0, cat, 2, k, i)
                before, _ = synthetic._render(cat, rng, SIZE)
                after = _read(root / "test" / defect / f"{i:03d}.png")
                mask = _read(root / "ground_truth" / defect / f"{i:03d}_mask.png") > 0
                changes.append(np.abs(after.astype(float) - before)[mask].mean())
    # Measured at seed 0, size 64: carpet 0.32, wood 0.72, capsule 0.72, metal_nut 0.38
    # (0.32-0.87 over seeds 0-5); at size 128 with the defaults: 0.58, 0.85, 0.65, 0.53.
    for cat, kind in synthetic.CATEGORIES.items():
        limit = 0.9 if kind == "object" else 0.95
        assert aurocs[cat] < limit, aurocs
    # Measured minimum 15.8 grey levels inside the mask.
    assert min(changes) > 8, min(changes)


def test_cli_writes_the_layout_and_says_where(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_core.data.synthetic", "--out", str(out),
         "--categories", "carpet,capsule", "--size", "48", "--n-train", "2",
         "--n-test-good", "1", "--n-test-defect", "1", "--seed", "3"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert "carpet" in result.stdout and "capsule" in result.stdout
    assert str(out.resolve()) in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["capsule", "carpet"]
    for cat in ("carpet", "capsule"):
        assert len(list((out / cat / "train" / "good").glob("*.png"))) == 2
        for defect in synthetic.DEFECTS:
            assert (out / cat / "test" / defect / "000.png").is_file()
            assert (out / cat / "ground_truth" / defect / "000_mask.png").is_file()


def test_cli_names_a_bad_category(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_core.data.synthetic", "--out", str(tmp_path),
         "--categories", "zebra"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0 and "zebra" in result.stderr


# ---------------------------------------------------------------- high resolution, small defects

SMALL = (10, 40)


def _shrink(image: np.ndarray) -> np.ndarray:
    """The whole image resized to 256 px, as a non-tiled detector would see it."""
    small = Image.fromarray(image).resize((256, 256), Image.Resampling.BILINEAR)
    return np.asarray(small).astype(float)


def _changed_only_in(good: np.ndarray, bad: np.ndarray, mask: np.ndarray) -> bool:
    return not ((good != bad).any(-1) & ~mask).any()


def _contrast_kept(good_small: np.ndarray, good: np.ndarray, bad: np.ndarray,
                   mask: np.ndarray) -> float:
    """Full-resolution contrast inside the mask over the 256 px contrast where the mask lands."""
    full = np.abs(bad[mask].astype(float) - good[mask]).mean()
    footprint = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((256, 256), Image.Resampling.BOX)
    ) > 0
    small = np.abs(_shrink(bad) - good_small)[footprint].mean()
    return full / small


@pytest.fixture(scope="module")
def wood_2048() -> tuple[np.ndarray, np.ndarray]:
    return synthetic._render("wood", np.random.default_rng(0), 2048)


def test_size_and_defect_px_limits() -> None:
    with pytest.raises(ValueError, match="16384"):
        synthetic.make_image("wood", np.random.default_rng(0), 16384)
    with pytest.raises(ValueError, match="defect_px"):
        synthetic.generate("unused", size=256, defect_px=(10, 200))


@pytest.mark.parametrize("size, category", [(2048, "carpet"), (4096, "metal_nut")])
def test_large_images_render_with_their_defect_region(size: int, category: str) -> None:
    image, region = synthetic._render(category, np.random.default_rng(1), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert region.shape == (size, size) and region.dtype == bool
    assert 0.05 < region.mean() <= 1.0
    # A photograph, not a flat or clipped field.
    assert 20 < image[::4, ::4].mean() < 235 and image[::4, ::4].std() > 5


def test_small_defects_are_one_piece_10_to_40_px_across_and_only_there(wood_2048) -> None:
    from scipy import ndimage

    good, region = wood_2048
    for i, defect in enumerate(synthetic.DEFECTS * 2):
        bad, mask = synthetic.add_defect(good, defect, np.random.default_rng(i), region=region,
                                         defect_px=SMALL)
        assert _changed_only_in(good, bad, mask)
        labels, n = ndimage.label(mask)
        assert n == 1, (defect, n)
        (rows, cols), = ndimage.find_objects(labels)
        across = max(rows.stop - rows.start, cols.stop - cols.start)
        assert SMALL[0] <= across <= SMALL[1], (defect, across)
        change = np.abs(bad[mask].astype(float) - good[mask]).mean()
        assert change > 8, (defect, change)


def test_small_defects_stay_on_the_object() -> None:
    good, region = synthetic._render("capsule", np.random.default_rng(2), 2048)
    for i, defect in enumerate(synthetic.DEFECTS):
        _, mask = synthetic.add_defect(good, defect, np.random.default_rng(i), region=region,
                                       defect_px=SMALL)
        assert region[mask].all()


def test_small_defects_fade_when_the_image_is_shrunk_to_256_px(wood_2048) -> None:
    """The reason for tiling: at 256 px a 10-40 px defect keeps a fraction of its contrast."""
    good, region = wood_2048
    good_small = _shrink(good)
    for i in range(3):
        for defect in ("scratch", "crack"):
            bad, mask = synthetic.add_defect(good, defect, np.random.default_rng(i),
                                             region=region, defect_px=SMALL)
            # Thin defects at 2048 px: measured 3.2-5.9x less contrast.
            assert _contrast_kept(good_small, good, bad, mask) > 2.5, defect
    big, big_region = synthetic._render("carpet", np.random.default_rng(0), 4096)
    big_small = _shrink(big)
    for defect in synthetic.DEFECTS:
        bad, mask = synthetic.add_defect(big, defect, np.random.default_rng(0),
                                         region=big_region, defect_px=SMALL)
        # At 4096 px even compact spots and stains: measured >= 2.8x (thin ones >= 5x).
        assert _contrast_kept(big_small, big, bad, mask) > 2.2, defect


def test_generate_writes_large_images_with_small_defects(tmp_path: Path) -> None:
    size = synthetic.DIRECT_MAX_SIZE + 64
    synthetic.generate(str(tmp_path), categories=["wood"], size=size, n_train=0, n_test_good=0,
                       n_test_defect=1, seed=0, defect_px=(12, 30))
    for kind, defect in enumerate(synthetic.DEFECTS, start=1):
        image = _read(tmp_path / "wood" / "test" / defect / "000.png")
        mask = _read(tmp_path / "wood" / "ground_truth" / defect / "000_mask.png") > 0
        assert image.shape == (size, size, 3) and mask.shape == (size, size)
        ys, xs = np.nonzero(mask)
        assert 12 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 30
        if kind == 1:
            # The same scene without the defect, from the same seed: only the mask differs.
            before, _ = synthetic._render("wood", synthetic._rng(0, "wood", 2, kind, 0), size)
            assert _changed_only_in(before, image, mask)
