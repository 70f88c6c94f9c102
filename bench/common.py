"""What the benchmarks share: the environment, image sets, detectors at their defaults and as
artifacts, fresh processes to measure in, the table they print and the JSON they write."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# The repository root: `python -m bench.<name>` and `python -m jobs.<name>` run from here.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DETECTORS = ("autoencoder", "padim", "patchcore", "vit_knn", "fastflow", "stpm", "simplenet")
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_OFFLINE": "1"}
# The calibration of the benches' artifacts: scores and maps in [0, 2], thresholds at 1. Speed
# does not depend on it; it only has to be one that rows and masks can be made with.
CALIBRATION = {"threshold": 1.0, "pixel_threshold": 1.0, "min": 0.0, "max": 2.0,
               "method": "bench", "pixel_min": 0.0, "pixel_max": 2.0}
# The training benchmarks' cases: every detector at its defaults, and the options that change
# what trains.
TRAIN_CASES = [
    ("autoencoder", {}),
    ("autoencoder", {"transfer_learning": True}),
    ("fastflow", {}),
    ("fastflow", {"train_backbone": False}),
    ("stpm", {}),
    ("simplenet", {}),
    ("padim", {}),
    ("patchcore", {}),
]


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


def synchronizer(device: str) -> Callable[[], None]:
    """What a timing calls before reading the clock: waits for a GPU's queued work, or nothing."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def bench_artifact(detector):
    """`detector` as a ModelArtifact with CALIBRATION, as the Scorer and the jobs take it."""
    from anomaly_core.model.artifact import ModelArtifact
    from anomaly_core.model.calibration import Calibration

    return ModelArtifact(detector, Calibration(**CALIBRATION))


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


def write_split(folder: str, size: int, n_train: int, n_test: int) -> None:
    """A synthetic capsule tree in `folder`: n_train good images to fit on; n_test // 2 good
    and n_test // 8 (at least one) defective ones, with masks, to test on."""
    from anomaly_core.data.synthetic import generate

    generate(folder, categories=["capsule"], size=size, n_train=n_train,
             n_test_good=n_test // 2, n_test_defect=max(1, n_test // 8))


def load_split(folder: str, size: int):
    """The tree of write_split as float tensors: (train images [N,3,s,s], test images, test
    labels, test masks)."""
    import torch

    from tests.helpers import synthetic_split

    train, test = synthetic_split(folder, "capsule", size)
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    items = [test[i] for i in range(len(test))]
    return (x, torch.stack([t["image"] for t in items]),
            torch.tensor([int(t["label"]) for t in items]),
            torch.stack([t["mask"] for t in items]) > 0.5)


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


def options_text(options: dict[str, Any]) -> str:
    """A case's options as a table shows them: key=value,... or "defaults"."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def backbone_text(name: str, options: dict[str, Any]) -> str:
    """The backbone a case trains with, "-" for the autoencoder's own convolutions."""
    from anomaly_core.detectors import make_config

    config = make_config(name, **options)
    return "-" if name == "autoencoder" and not config.transfer_learning else config.backbone


def proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, RssFile, RssAnon) in bytes; None
    where there is none (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def module_command(module: str, *args: str) -> list[str]:
    """`python -m <module> <args>` with this interpreter; run it with cwd=REPO."""
    return [sys.executable, "-m", module, *args]


def run_fresh(module: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh process from the repository root, its output
    captured as text: a measurement of its own (its imports and memory are not this one's)."""
    return subprocess.run(module_command(module, *args), cwd=REPO, capture_output=True,
                          text=True, **kwargs)


def last_json(stdout: str) -> Any:
    """The JSON a child printed as its last line."""
    return json.loads(stdout.strip().splitlines()[-1])


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
