"""What the Scorer's layout choices are worth, per detector at its defaults: NCHW against
channels_last, and BatchNorms folded into the convolutions or not, timed alternately on the same
uint8 batch (one process, `--rounds` rounds of each variant, so all see the same machine).

Each variant is its own detector instance with the same weights (channels_last converts a
detector's parameters in place); memory detectors share one fitted set of statistics. Random
weights: speed does not depend on their values.

    python -m bench.inference_layout [--detectors all] [--batch-size 16] [--rounds 6] [--out F]
    python -m bench.inference_layout --smoke      # tiny, one small detector (CI)
"""

from __future__ import annotations

import argparse
import os
import time

from anomaly_core.config import parse_overrides
from bench.common import (
    DETECTORS,
    bench_artifact,
    cuda_available,
    detector_at_defaults,
    machine,
    print_table,
    synchronizer,
    write_json,
)

# (name, channels_last, fold_batchnorm); the last is the Scorer's default
VARIANTS = (("nchw", False, False), ("channels_last", True, False),
            ("channels_last+folded", True, True))


def compare(name: str, args: argparse.Namespace, sets: dict) -> dict:
    """images/s of each variant for one detector, and the largest relative score change."""
    import torch

    from anomaly_core.scoring.scorer import Scorer

    torch.manual_seed(0)
    fitted = detector_at_defaults(name, args.device, args.fit_images, sets)
    scorers = {}
    for variant, channels_last, fold in VARIANTS:
        detector = fitted if variant == "nchw" else _same_as(fitted, sets, args.device)
        scorers[variant] = Scorer(bench_artifact(detector), device=args.device, precision="fp32",
                                  channels_last=channels_last, fold_batchnorm=fold)
    size = fitted.config.image_size
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8,
                          generator=g).to(args.device)
    sync = synchronizer(args.device)
    scores = {v: s(batch).score for v, s in scorers.items()}  # warm-up, and the scores
    spent = dict.fromkeys(scorers, 0.0)
    for _ in range(args.rounds):
        for variant, scorer in scorers.items():
            sync()
            start = time.perf_counter()
            scorer(batch)
            sync()
            spent[variant] += time.perf_counter() - start
    ref = scores["nchw"]
    row = {"detector": name, "image_size": size,
           "max_score_change": max(float(((s - ref).abs() / ref.abs().clamp_min(1e-12)).max())
                                   for s in scores.values())}
    for variant in scorers:
        row[variant] = args.rounds * args.batch_size / spent[variant]
    row["channels_last_x"] = row["channels_last"] / row["nchw"]
    row["folded_x"] = row["channels_last+folded"] / row["channels_last"]
    row["default_x"] = row["channels_last+folded"] / row["nchw"]
    return row


def _same_as(fitted, sets: dict, device: str):
    """Another instance of `fitted`'s detector with its weights, sharing its fitted statistics
    (the same tensors: PaDiM's are gigabytes)."""
    from anomaly_core.detectors import build_detector

    fields = {**vars(fitted.config), **sets}
    detector = build_detector(fitted.name, **fields).to(device)
    for key in fitted.statistics:  # sized to the fitted ones before the weights are loaded
        setattr(detector, key, getattr(fitted, key))
    detector.load_state_dict(fitted.state_dict())
    return detector.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detectors", default=",".join(DETECTORS))
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6, help="alternations of the variants")
    p.add_argument("--fit-images", type=int, default=16, help="images memory detectors fit on")
    p.add_argument("--set", action="append", default=[], help="detector option key=value")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it run (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                 "inference_layout.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.detectors, args.batch_size, args.rounds, args.fit_images = "padim", 2, 1, 4
        args.set = ["image_size=64", "backbone=resnet18", *args.set]
    sets = parse_overrides(args.set)
    rows = []
    for name in args.detectors.split(","):
        try:
            rows.append(compare(name, args, sets))
        except Exception as exc:  # one detector's failure is a row, not the end of the table
            rows.append({"detector": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    print(f"\nScorer layouts on {args.device}, batch {args.batch_size}, fp32, {args.rounds} "
          "alternating rounds; images/s")
    print_table(rows, [("detector", "detector"), ("image_size", "px"), ("nchw", "NCHW"),
                       ("channels_last", "channels_last"),
                       ("channels_last+folded", "+ folded (default)"),
                       ("channels_last_x", "channels_last x"), ("folded_x", "folded x"),
                       ("default_x", "default x"), ("max_score_change", "max score change"),
                       ("error", "error")])
    result = {"machine": machine(), "args": vars(args), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
