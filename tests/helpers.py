"""Shared test helpers: in-memory image datasets and a loopback port for torch.distributed."""

import socket

import torch
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """Images [N,3,H,W] as the dataset items fit() and predict() read (normal, no mask)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        mask = torch.zeros(self.images.shape[-2:])
        return {"image": self.images[i], "label": 0, "mask": mask, "index": i}


def random_images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    """Seeded uniform-noise images [n,3,size,size]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_split(root: str, category: str, size: int):
    """(train, test) ImageDatasets of one category of a synthetic MVTec-style tree."""
    from anomaly_core.data.datasets import ImageDataset, mvtec_records

    return tuple(
        ImageDataset(mvtec_records(root, category, split), (size, size)) for split in ("train", "test")
    )
