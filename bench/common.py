"""What the benchmarks share: the environment, an image set, detectors at their defaults, the
table they print and the JSON they write."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from datetime import UTC, datetime
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DETECTORS = ("autoencoder", "padim", "patchcore", "vit_knn", "fastflow", "stpm", "simplenet")
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_OFFLINE": "1"}


def set_env() -> None:
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def machine() -> dict[str, Any]:
    """What the numbers were taken on."""
    import torch

    info = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _link(src: str, dst: str) -> None:
    """A hard link (no bytes copied: 24,000 files of 512 px are 10 GB as copies), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def image_set(folder: str, n: int, size: int, fmt: str = "png", distinct: int = 40) -> list[str]:
    """n synthetic capsule images of size x size px in `folder` as PNG or JPEG files: `distinct`
    generated ones, linked (or copied) under new names up to n (decoding costs the same)."""
    from PIL import Image

    from anomaly_core.data.synthetic import generate

    source = os.path.join(folder, "_generated")
    generate(source, categories=["capsule"], size=size, n_train=min(n, distinct), n_test_good=0,
             n_test_defect=0)
    made = sorted(os.path.join(source, "capsule", "train", "good", f)
                  for f in os.listdir(os.path.join(source, "capsule", "train", "good")))
    out = os.path.join(folder, "images")
    os.makedirs(out, exist_ok=True)
    paths = []
    for i in range(n):
        src = made[i % len(made)]
        dst = os.path.join(out, f"{i:07d}.{fmt}")
        if fmt == "png" or i >= len(made):
            _link(src if fmt == "png" else paths[i % len(made)], dst)
        else:
            Image.open(src).convert("RGB").save(dst, quality=90)
        paths.append(dst)
    shutil.rmtree(source)
    return paths


def detector_at_defaults(name: str, device: str, fit_images: int, sets: dict[str, Any]):
    """A detector at its defaults (plus `sets`), random weights (speed and memory do not depend
    on their values), fitted on `fit_images` synthetic images when it is a memory detector."""
    import torch

    from anomaly_core.detectors import build_detector
    from anomaly_core.training.fit import fit
    from tests.helpers import TensorImages

    fields = {"weights": "random", **sets}
    if name == "autoencoder":
        fields.pop("weights")  # its default has no pretrained part
    detector = build_detector(name, **fields)
    if detector.family == "memory":
        size = detector.config.image_size
        images = torch.rand(fit_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        fit(detector, TensorImages(images), batch_size=16, device=device)
    return detector.to(device).eval()


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set key=value (JSON values where they parse) into config overrides."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """One line per row; columns are (key, header)."""
    widths = [max(len(h), *(len(_cell(r.get(k))) for r in rows)) for k, h in columns]
    print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_cell(r.get(k)).rjust(w) for (k, _), w in zip(columns, widths)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"\nwrote {path}")

