"""Image listings (MVTec AD layout or a plain folder) and the one image-to-tensor preparation.

Local paths and s3:// URIs alike, through anomaly_core.storage.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image

from anomaly_core import storage
from anomaly_core.data.decode import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    check_size,
    decode_mask,
    load_image,
    resize_pixels,
)

MVTEC_SPLITS = ("train", "test")
GOOD = "good"


@dataclass(frozen=True)
class ImageRecord:
    """One image: its URI, and for labelled data its label, defect type and mask."""

    uri: str
    label: int | None = None  # 0 good, 1 defect, None unknown (plain folder)
    defect: str | None = None  # "good" or the defect type, MVTec layout only
    mask_uri: str | None = None


def mvtec_categories(root: str) -> list[str]:
    """Sorted names of the folders under root that hold images in <category>/train/good/."""
    if not storage.exists(root):
        raise FileNotFoundError(f"MVTec root {root} does not exist; check the path or bucket")
    categories = set()
    for uri in storage.list_files(root, extensions=IMAGE_EXTENSIONS):
        parts = _parts_below(root, uri)
        if len(parts) >= 4 and parts[1] == "train" and parts[2] == GOOD:
            categories.add(parts[0])
    if not categories:
        raise ValueError(
            f"no MVTec categories under {root}: expected <category>/train/good/<image> folders; "
            "check that root is the dataset folder, not a category inside it"
        )
    return sorted(categories)


def mvtec_records(
    root: str, category: str, split: str
) -> list[ImageRecord]:
    """Records of one MVTec AD category and split ("train" or "test"), sorted by URI.

    Images sit in <category>/<split>/<defect>/; "good" gives label 0 and no mask, any other
    defect folder label 1 with mask <category>/ground_truth/<defect>/<stem>_mask.png when
    that file exists (else mask_uri None).
    """
    if split not in MVTEC_SPLITS:
        raise ValueError(f"split {split!r} is not one of {MVTEC_SPLITS}")
    split_dir = storage.join(root, category, split)
    if not storage.exists(split_dir):
        raise FileNotFoundError(
            f"MVTec category {category!r} has no {split} folder under {root} ({split_dir}); "
            "check the root and category name (mvtec_categories(root) lists them)"
        )
    masks = _mvtec_masks(storage.join(root, category, "ground_truth"))
    records = []
    for uri in storage.list_files(split_dir, extensions=IMAGE_EXTENSIONS):
        parts = _parts_below(split_dir, uri)
        if len(parts) < 2:
            raise ValueError(
                f"{uri} sits directly in {split_dir}; MVTec layout puts images in "
                f"{split}/<defect>/ (use {split}/good/ for defect-free images)"
            )
        defect, below = parts[0], parts[1:]
        if defect == GOOD:
            records.append(ImageRecord(uri, label=0, defect=GOOD))
            continue
        stem = os.path.splitext(below[-1])[0]
        mask_key = (defect, *below[:-1], f"{stem}_mask.png")
        records.append(ImageRecord(uri, label=1, defect=defect, mask_uri=masks.get(mask_key)))
    if not records:
        raise ValueError(f"no images in {split_dir}; expected {split}/<defect>/<image> files")
    return records


def folder_records(
    root: str,
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[ImageRecord]:
    """Unlabelled records of every image under root, recursively, sorted by URI."""
    extensions = tuple(extensions)
    uris = storage.list_files(root, extensions=extensions)
    if not uris:
        raise ValueError(
            f"no images with extensions {', '.join(extensions)} under {root}; "
            "check the path, or pass extensions matching the files"
        )
    return [ImageRecord(uri) for uri in uris]


def split_records(
    records: Sequence[ImageRecord], fraction: float, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split into (train, held_out), held_out getting round(fraction * n) records.

    At least one is held out when fraction > 0 and n >= 2, and at least one kept for training.
    The held-out set depends only on the URIs and the seed, not on the order of records, and
    adding a file moves at most one other between the sides.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction {fraction} must be in [0, 1): the share held out of training")
    n = len(records)
    held = round(fraction * n)
    if fraction > 0 and n >= 2:
        held = min(max(held, 1), n - 1)

    def rank(i: int) -> tuple[bytes, int]:
        key = f"{seed}:{records[i].uri}".encode()
        return hashlib.blake2b(key, digest_size=8).digest(), i

    held_idx = set(sorted(range(n), key=rank)[:held])
    train = [r for i, r in enumerate(records) if i not in held_idx]
    held_out = [r for i, r in enumerate(records) if i in held_idx]
    return train, held_out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """HxWx3 uint8 RGB to a uint8 tensor [3, height, width]: decode.resize_pixels, the one
    resize used by training and scoring."""
    return torch.from_numpy(resize_pixels(image, size))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any leading shape) to float32 in [0, 1]: what detectors take."""
    return images.to(torch.float32).div_(255.0)


def prepare_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """HxWx3 uint8 RGB to float32 [3, height, width] in [0, 1]: resize_image, then to_unit_float."""
    return to_unit_float(resize_image(image, size))


def prepare_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """HxW bool mask to float32 [height, width] of 0/1, resized nearest (no new values)."""
    if mask.ndim != 2:
        raise ValueError(
            f"mask must be an HxW array (decode_mask gives one), got shape {mask.shape}"
        )
    height, width = check_size(size)
    mask = mask.astype(bool)
    if mask.shape != (height, width):
        scaled = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(scaled.resize((width, height), Image.Resampling.NEAREST)) > 127
    return torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32)


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, resized images (and masks) of a list of records, for training and evaluation.

    A bad image raises ImageDecodeError: training data must be clean, so nothing is skipped.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        size: tuple[int, int],
    ) -> None:
        self.records = list(records)
        self.size = check_size(size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        """{"image": [3,h,w], "label": int (-1 unknown), "mask": [h,w] (zeros if none), "index"}."""
        record = self.records[index]
        image = load_image(record.uri)
        if record.mask_uri is None:
            mask = torch.zeros(self.size, dtype=torch.float32)
        else:
            data = storage.read_bytes(record.mask_uri)
            raw_mask = decode_mask(data, record.mask_uri)
            if raw_mask.shape != image.shape[:2]:
                raise ImageDecodeError(
                    record.mask_uri,
                    f"mask is {raw_mask.shape[1]}x{raw_mask.shape[0]} but its image "
                    f"{record.uri} is {image.shape[1]}x{image.shape[0]}",
                    "check the ground_truth file belongs to this image",
                )
            mask = prepare_mask(raw_mask, self.size)
        return {
            "image": prepare_image(image, self.size),
            "label": -1 if record.label is None else record.label,
            "mask": mask,
            "index": index,
        }


def _mvtec_masks(gt_dir: str) -> dict[tuple[str, ...], str]:
    """Mask URIs under ground_truth/ keyed by their path parts (defect, ..., file name)."""
    if not storage.exists(gt_dir):
        return {}
    uris = storage.list_files(gt_dir, extensions=IMAGE_EXTENSIONS)
    return {tuple(_parts_below(gt_dir, uri)): uri for uri in uris}


def _parts_below(folder: str, uri: str) -> list[str]:
    """Path parts of a URI listed by storage.list_files(folder) below that folder."""
    if storage.is_s3(folder):
        return uri[len(folder.rstrip("/")) + 1 :].split("/")
    if folder.startswith("file://"):
        folder = unquote(urlparse(folder).path)
    # list_files gives absolute local paths; relpath copes with a relative folder.
    return os.path.relpath(uri, folder).split(os.sep)
