"""Listings of MVTec and plain folders, the train/held-out split, and image tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_core import storage
from anomaly_core.data.datasets import (
    ImageDataset,
    ImageRecord,
    folder_records,
    mvtec_categories,
    mvtec_records,
    prepare_image,
    prepare_mask,
    split_records,
)
from anomaly_core.data.decode import ImageDecodeError


def write_png(path: Path, value: int = 128, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


def write_mask(path: Path, defect_rows: int, size: int = 16) -> None:
    pixels = np.zeros((size, size), np.uint8)
    pixels[:defect_rows] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """A tiny MVTec AD tree: bottle (train, test good/crack, one crack mask), cable (train)."""
    root = tmp_path / "mvtec"
    bottle = root / "bottle"
    write_png(bottle / "train" / "good" / "000.png")
    write_png(bottle / "train" / "good" / "001.png")
    write_png(bottle / "test" / "good" / "000.png")
    write_png(bottle / "test" / "crack" / "000.png", value=10)
    write_png(bottle / "test" / "crack" / "001.png", value=20)  # no mask file
    write_mask(bottle / "ground_truth" / "crack" / "000_mask.png", defect_rows=8)
    (bottle / "license.txt").write_text("CC BY-NC-SA")
    write_png(root / "cable" / "train" / "good" / "000.png")
    write_png(root / "previews" / "bottle.png")  # no train/good: not a category
    return root


def names(records: list[ImageRecord], root: Path) -> list[str]:
    return [Path(r.uri).relative_to(root).as_posix() for r in records]


def test_mvtec_categories_are_folders_with_train_good(mvtec):
    assert mvtec_categories(str(mvtec)) == ["bottle", "cable"]


def test_mvtec_categories_of_missing_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mvtec_categories(str(tmp_path / "nowhere"))


def test_mvtec_categories_of_a_category_folder_says_to_pass_the_root(mvtec):
    with pytest.raises(ValueError, match="not a category inside it"):
        mvtec_categories(str(mvtec / "bottle"))


def test_mvtec_train_records_are_good_with_label_zero(mvtec):
    records = mvtec_records(str(mvtec), "bottle", "train")
    assert names(records, mvtec) == ["bottle/train/good/000.png", "bottle/train/good/001.png"]
    assert {(r.label, r.defect, r.mask_uri) for r in records} == {(0, "good", None)}


def test_mvtec_test_records_pair_defects_with_their_masks(mvtec):
    records = {
        Path(r.uri).relative_to(mvtec).as_posix(): r
        for r in mvtec_records(str(mvtec), "bottle", "test")
    }
    assert sorted(records) == [
        "bottle/test/crack/000.png",
        "bottle/test/crack/001.png",
        "bottle/test/good/000.png",
    ]
    good = records["bottle/test/good/000.png"]
    assert (good.label, good.defect, good.mask_uri) == (0, "good", None)
    crack = records["bottle/test/crack/000.png"]
    assert (crack.label, crack.defect) == (1, "crack")
    assert Path(crack.mask_uri) == mvtec / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    unmasked = records["bottle/test/crack/001.png"]
    assert (unmasked.label, unmasked.defect, unmasked.mask_uri) == (1, "crack", None)


def test_mvtec_records_accept_a_relative_root(mvtec, monkeypatch):
    monkeypatch.chdir(mvtec.parent)
    records = mvtec_records("mvtec", "bottle", "test")
    assert [r.defect for r in records] == ["crack", "crack", "good"]
    assert records[0].mask_uri is not None


def test_mvtec_records_on_s3_pair_masks_by_key(monkeypatch):
    # The listing as storage.list_files gives it for s3:// (full URIs); no server needed.
    keys = [
        "bottle/train/good/000.png",
        "bottle/test/good/000.png",
        "bottle/test/crack/000.png",
        "bottle/ground_truth/crack/000_mask.png",
    ]
    bucket = "s3://inspection/mvtec"

    def list_files(uri, *, extensions=None, recursive=True):
        prefix = uri.rstrip("/") + "/"
        return sorted(f"{bucket}/{k}" for k in keys if f"{bucket}/{k}".startswith(prefix))

    def exists(uri):
        return bool(list_files(uri))

    monkeypatch.setattr(storage, "list_files", list_files)
    monkeypatch.setattr(storage, "exists", exists)
    assert mvtec_categories(bucket + "/") == ["bottle"]
    records = mvtec_records(bucket + "/", "bottle", "test")
    assert records == [
        ImageRecord(
            f"{bucket}/bottle/test/crack/000.png",
            label=1,
            defect="crack",
            mask_uri=f"{bucket}/bottle/ground_truth/crack/000_mask.png",
        ),
        ImageRecord(f"{bucket}/bottle/test/good/000.png", label=0, defect="good"),
    ]


def test_mvtec_records_of_missing_category_name_root_and_category(mvtec):
    with pytest.raises(FileNotFoundError, match=f"'screw' has no test folder under {mvtec}"):
        mvtec_records(str(mvtec), "screw", "test")


def test_mvtec_records_refuse_an_unknown_split(mvtec):
    with pytest.raises(ValueError, match="'validation'"):
        mvtec_records(str(mvtec), "bottle", "validation")


def test_mvtec_image_outside_a_defect_folder_is_refused(mvtec):
    write_png(mvtec / "bottle" / "test" / "stray.png")
    with pytest.raises(ValueError, match="stray.png sits directly in"):
        mvtec_records(str(mvtec), "bottle", "test")


def test_folder_records_recurse_and_filter_by_extension(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "line1" / "b.bmp")
    write_png(tmp_path / "line1" / "deep" / "c.JPG")
    (tmp_path / "line1" / "notes.txt").write_text("not an image")
    records = folder_records(str(tmp_path))
    assert names(records, tmp_path) == ["a.png", "line1/b.bmp", "line1/deep/c.JPG"]
    assert {(r.label, r.defect, r.mask_uri) for r in records} == {(None, None, None)}
    only_png = folder_records(str(tmp_path), extensions=(".png",))
    assert names(only_png, tmp_path) == ["a.png"]


def test_folder_without_images_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"no images .* under {tmp_path}"):
        folder_records(str(tmp_path))


def records_named(n: int) -> list[ImageRecord]:
    return [ImageRecord(f"s3://bucket/img_{i:03d}.png") for i in range(n)]


def test_split_is_deterministic_sized_and_disjoint():
    records = records_named(20)
    train, held = split_records(records, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held, key=lambda r: r.uri) == records
    assert split_records(records, 0.25, seed=3) == (train, held)
    assert split_records(records, 0.25, seed=4)[1] != held


def test_split_does_not_depend_on_record_order():
    records = records_named(20)
    held = split_records(records, 0.25, seed=3)[1]
    held_reversed = split_records(records[::-1], 0.25, seed=3)[1]
    assert {r.uri for r in held_reversed} == {r.uri for r in held}


def test_split_holds_out_one_from_two_even_for_a_tiny_fraction():
    train, held = split_records(records_named(2), 0.01)
    assert (len(train), len(held)) == (1, 1)


def test_split_keeps_one_for_training_when_fraction_rounds_to_all():
    train, held = split_records(records_named(2), 0.9)
    assert (len(train), len(held)) == (1, 1)


def test_split_with_zero_fraction_holds_out_nothing():
    records = records_named(5)
    assert split_records(records, 0.0) == (records, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_refuses_fraction_outside_zero_to_one(fraction):
    with pytest.raises(ValueError, match="fraction"):
        split_records(records_named(5), fraction)


def test_prepare_image_gives_float_channels_first_in_unit_range():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = 255
    tensor = prepare_image(image, (10, 12))
    assert tensor.shape == (3, 10, 12)  # size is (height, width)
    assert tensor.dtype == torch.float32
    assert tensor.min() == 0.0 and tensor.max() == 1.0


def test_prepare_image_at_its_own_size_is_exact():
    image = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    tensor = prepare_image(image, (8, 6))
    expected = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(tensor, expected)


def test_prepare_image_antialiases_when_downscaling():
    # A one-pixel checkerboard averages to grey; a plain bilinear sample would keep 0s and 1s.
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[:, :, None], 3, axis=2)
    tensor = prepare_image(image, (8, 8))
    assert torch.allclose(tensor, torch.full_like(tensor, 0.5), atol=0.05)


def test_prepare_image_refuses_anything_but_hxwx3_uint8():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        prepare_image(np.zeros((8, 8), np.uint8), (4, 4))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        prepare_image(np.zeros((8, 8, 3), np.float32), (4, 4))


def test_prepare_image_refuses_a_bad_size():
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), (0, 4))


def test_prepare_mask_resizes_nearest_and_stays_binary():
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    tensor = prepare_mask(mask, (4, 6))
    assert tensor.shape == (4, 6) and tensor.dtype == torch.float32
    assert set(tensor.unique().tolist()) == {0.0, 1.0}
    assert tensor[:2].eq(1).all() and tensor[2:].eq(0).all()


def test_dataset_items_carry_image_label_mask_and_index(mvtec):
    records = mvtec_records(str(mvtec), "bottle", "test")
    dataset = ImageDataset(records, (8, 4))
    assert len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    assert [item["index"] for item in items] == [0, 1, 2]
    assert [item["label"] for item in items] == [1, 1, 0]
    for item in items:
        assert item["image"].shape == (3, 8, 4) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (8, 4) and item["mask"].dtype == torch.float32
    assert items[0]["image"].mean().item() == pytest.approx(10 / 255)
    assert items[0]["mask"][:4].eq(1).all() and items[0]["mask"][4:].eq(0).all()
    assert items[1]["mask"].eq(0).all()  # crack without a mask file
    assert items[2]["mask"].eq(0).all()  # good


def test_dataset_gives_label_minus_one_for_unlabelled_images(tmp_path):
    write_png(tmp_path / "x.png")
    item = ImageDataset(folder_records(str(tmp_path)), (4, 4))[0]
    assert item["label"] == -1


def test_dataset_batches_through_the_default_collate(mvtec):
    dataset = ImageDataset(mvtec_records(str(mvtec), "bottle", "test"), (8, 8))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8)
    assert batch["label"].tolist() == [1, 1, 0]
    assert batch["index"].tolist() == [0, 1, 2]


def test_dataset_corrupt_image_raises_decode_error_naming_it(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = ImageDataset([ImageRecord(str(bad))], (4, 4))
    with pytest.raises(ImageDecodeError, match=f"{bad}: "):
        dataset[0]


def test_dataset_mask_of_another_size_is_refused_naming_both(mvtec):
    mask_path = mvtec / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    write_mask(mask_path, defect_rows=4, size=8)
    image_path = mvtec / "bottle" / "test" / "crack" / "000.png"
    record = ImageRecord(str(image_path), label=1, defect="crack", mask_uri=str(mask_path))
    with pytest.raises(ImageDecodeError, match=f"{mask_path}: mask is 8x8 but its image"):
        ImageDataset([record], (4, 4))[0]


def test_dataset_refuses_a_bad_size():
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        ImageDataset([], (4,))


def test_records_are_sorted_by_uri(mvtec):
    write_png(mvtec / "bottle" / "test" / "broken_large" / "000.png")
    uris = [r.uri for r in mvtec_records(str(mvtec), "bottle", "test")]
    assert uris == sorted(uris) and len(uris) == 4
