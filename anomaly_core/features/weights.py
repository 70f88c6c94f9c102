"""Pre-seed pretrained weights for air-gapped clusters: download once, store in a bucket or volume.

    python -m anomaly_core.features.weights download --backbone wide_resnet50_2 --to s3://bucket/weights/
    python -m anomaly_core.features.weights list

Jobs then read them with `--set weights=s3://bucket/weights/<file>` (or mount the folder as
$TORCH_HOME/hub/checkpoints and keep `weights=imagenet`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from anomaly_core import storage
from anomaly_core.features.backbones import (
    TORCHVISION_MODELS,
    _check_hash,
    cached_weights_path,
    offline_weights_path,
    torchvision_weights_url,
)


def download(backbone: str, destination: str) -> str:
    """Fetch `backbone`'s ImageNet file (hash-checked) and copy it to `destination`/<file>."""
    import torch

    if backbone not in TORCHVISION_MODELS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(TORCHVISION_MODELS)}")
    url = torchvision_weights_url(backbone)
    path = cached_weights_path(backbone)
    if not os.path.isfile(path) and offline_weights_path(backbone):
        path = offline_weights_path(backbone)
    if not os.path.isfile(path):
        with tempfile.TemporaryDirectory() as tmp:
            torch.hub.download_url_to_file(url, os.path.join(tmp, "w"), hash_prefix=None)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(os.path.join(tmp, "w"), path)
    _check_hash(path)
    target = storage.join(destination, os.path.basename(path))
    with open(path, "rb") as f:
        storage.write_bytes(target, f.read())
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m anomaly_core.features.weights", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download ImageNet weights once and store them")
    d.add_argument("--backbone", action="append", required=True, help="repeatable")
    d.add_argument("--to", required=True, help="folder or s3://bucket/prefix")
    d.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (sets AWS_ENDPOINT_URL_S3)")
    sub.add_parser("list", help="the backbones and the file names jobs will look for")
    args = p.parse_args(argv)
    if args.command == "list":
        for name in TORCHVISION_MODELS:
            print(f"{name:<18} {os.path.basename(torchvision_weights_url(name))}")
        return
    if args.s3_endpoint:
        storage.use_endpoint(args.s3_endpoint)
    for backbone in args.backbone:
        try:
            target = download(backbone, args.to)
        except (OSError, ValueError, storage.StorageError) as exc:
            sys.exit(f"{backbone}: {exc}")
        print(f"{backbone}: {target}  (use --set weights={target})")


if __name__ == "__main__":
    main()
