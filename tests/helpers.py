"""Shared test helpers: in-memory image datasets and a loopback port for torch.distributed."""

import os
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


def mask_quality(detector, train, test, n_fit: int, n_held: int) -> dict[str, float]:
    """Calibrate on held-out normal images (train[n_fit:n_fit + n_held], never fitted on), then
    the masks' pixel F1 on the defective test images and the share of pixels they mark on the
    normal ones, both at the calibrated pixel threshold; and the same share at the image
    threshold (what the calibration before per-quantity thresholds marked)."""
    from torch.utils.data import Subset

    from anomaly_core.training.evaluate import calibrate, predict

    held = predict(detector, Subset(train, range(n_fit, n_fit + n_held)), batch_size=8)
    calibration, _ = calibrate(held["scores"], held["maps"], held["labels"])
    pred = predict(detector, test, batch_size=8)
    bad, good = pred["labels"] == 1, pred["labels"] == 0
    marked, truth = pred["maps"][bad] >= calibration.pixel_threshold, pred["masks"][bad]
    old = pred["maps"][bad] >= calibration.threshold
    return {
        "f1": float(2 * (marked & truth).sum() / max(marked.sum() + truth.sum(), 1)),
        "normal_marked": float((pred["maps"][good] >= calibration.pixel_threshold).mean()),
        "old_f1": float(2 * (old & truth).sum() / max(old.sum() + truth.sum(), 1)),
        "old_normal_marked": float((pred["maps"][good] >= calibration.threshold).mean()),
    }


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


CHROMIUM = "/usr/bin/chromium"
# As root in a closed network: no sandbox, no GPU, none of Chromium's own background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def open_in_chromium(page: str, screenshot: str) -> dict:
    """Load a local HTML file in headless Chromium (Debian's, driven by Playwright); returns the
    thumbnails that rendered, broken images, console messages, page errors and requests made."""
    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: .ci/setup installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    out: dict = {"console": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        tab.on("console", lambda m: out["console"].append(f"{m.type}: {m.text}"))
        tab.on("pageerror", lambda e: out["console"].append(f"pageerror: {e}"))
        tab.on("request", lambda r: out["requests"].append(
            "data:" if r.url.startswith("data:") else r.url))
        tab.goto(f"file://{os.path.abspath(page)}", wait_until="load")
        out["thumbnails"] = tab.evaluate(
            "[...document.querySelectorAll('figure.thumb img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length")
        out["broken"] = tab.evaluate(
            "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
        out["title"] = tab.title()
        os.makedirs(os.path.dirname(screenshot), exist_ok=True)
        tab.screenshot(path=screenshot, full_page=True)
        browser.close()
    return out


def pids_named(word: bytes) -> list[int]:
    """Processes whose command line holds `word` (Ray titles actor processes after their
    class, e.g. b"ScoringActor" or b"RayTrainWorker"), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if word in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids
