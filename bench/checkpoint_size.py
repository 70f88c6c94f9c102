"""Checkpoint size per gradient detector: what fit() reports for a checkpoint (training_state and
optimizer state) against the full state_dict. Prints a table.

    python -m bench.checkpoint_size [--batch-size 2] [--threads 1]

Each detector at its default options and input size, random weights (sizes do not depend on
the values), after one optimizer step so the optimizer state exists. "checkpoint" is the state
fit() hands to report() serialized with torch.save, as jobs/train.py writes it; "before" is the
same with the whole state_dict in place of training_state (what checkpoints held until then).
"""

from __future__ import annotations

import argparse
import io

from bench.common import TRAIN_CASES, backbone_text, options_text

MB = 1e6


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nest of dicts and lists."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def saved_bytes(obj) -> int:
    """Size of torch.save(obj): the checkpoint file."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def measure(name: str, options: dict, batch: int) -> dict:
    """Sizes in bytes of one detector's full state_dict, training state, optimizer state, files."""
    import torch

    from anomaly_core.detectors import build_detector
    from anomaly_core.training.fit import fit

    torch.manual_seed(0)
    detector = build_detector(name, weights="random", **options)
    size = detector.config.image_size
    states = []
    images = [{"image": torch.rand(3, size, size)} for _ in range(batch)]
    fit(detector, images, batch_size=batch, report=lambda metrics, state: states.append(state))
    state = states[-1]
    full = detector.state_dict()
    before = {**state, "detector": full}
    return {
        "size": size,
        "params": sum(p.numel() for p in detector.parameters()),
        "trained": sum(p.numel() for p in detector.parameters() if p.requires_grad),
        "full": tensor_bytes(full),
        "training": tensor_bytes(state["detector"]),
        "optimizer": tensor_bytes(state["optimizers"]),
        "checkpoint": saved_bytes(state),
        "before": saved_bytes(before),
    }


# The training benchmark's gradient-detector cases (memory detectors keep no checkpoint).
CASES = [c for c in TRAIN_CASES if c[0] not in ("padim", "patchcore", "vit_knn")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"{'detector':<12}{'options':<24}{'backbone':<10}{'px':>4}{'trained/params':>20}"
          f"{'state_dict MB':>15}{'training MB':>13}{'optim MB':>10}{'ckpt MB':>9}"
          f"{'before MB':>11}{'ckpt/state_dict':>17}")
    for name, options in CASES:
        m = measure(name, options, args.batch_size)
        print(f"{name:<12}{options_text(options):<24}{backbone_text(name, options):<10}{m['size']:>4}"
              f"{m['trained']:>10,}/{m['params']:>10,}{m['full'] / MB:>14.2f}"
              f"{m['training'] / MB:>13.2f}{m['optimizer'] / MB:>10.2f}"
              f"{m['checkpoint'] / MB:>9.2f}{m['before'] / MB:>11.2f}"
              f"{m['checkpoint'] / m['full']:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
