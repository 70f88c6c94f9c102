"""PatchCore's nearest-neighbour products in float32 against bfloat16 (what `knn_dtype=auto`
takes on CPUs with bf16 instructions), at its defaults, on the same fitted bank and images.

Synthetic capsule images with defects and masks (train on good ones; test on good and
defective), random backbone weights (speed does not depend on their values; the comparison is
of one model's scores with itself). Per setting: the nearest-neighbour search's seconds per
batch and the forward's images/s (timed alternately, `--rounds` rounds of each), image and
pixel AUROC; between the two: the image scores' rank correlation, the share of patch distances
that are the same (the bf16 products found the exact nearest neighbour), and the largest ratio
of a patch distance to float32's.

    python -m bench.knn_products [--train 64] [--test 64] [--size 256] [--batch-size 16]
        [--rounds 4] [--set backbone=resnet18 ...] [--device cuda] [--out F]
    python -m bench.knn_products --smoke    # CI: tiny, resnet18, does it run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from anomaly_core.config import parse_overrides
from bench.common import (
    cuda_available,
    load_split,
    machine,
    print_table,
    set_env,
    synchronizer,
    write_json,
    write_split,
)

SETTINGS = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=64, help="test images (half defective)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--set", action="append", default=[], help="detector option key=value")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny, resnet18 (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "knn_products.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.test, args.size, args.batch_size, args.rounds = 8, 8, 64, 4, 1
        args.set = ["backbone=resnet18"]
    set_env()
    import torch
    from scipy.stats import spearmanr

    from anomaly_core.detectors import build_detector
    from anomaly_core.features.knn import cpu_bf16_products
    from anomaly_core.training.fit import fit
    from anomaly_core.training.metrics import image_auroc, pixel_auroc
    from tests.helpers import TensorImages

    data = tempfile.mkdtemp(prefix="bench-knn-products-")
    write_split(data, args.size, args.train, args.test)
    train, images, labels, masks = load_split(data, args.size)
    labels, masks = labels.numpy(), masks.numpy()
    torch.manual_seed(0)
    detector = build_detector("patchcore", image_size=args.size, weights="random",
                              **parse_overrides(args.set))
    fit(detector, TensorImages(train), batch_size=args.batch_size, seed=0, device=args.device)
    detector.to(args.device).eval()
    images = images.to(args.device)
    sync = synchronizer(args.device)
    batches = images.split(args.batch_size)
    spent = {s: {"knn": 0.0, "forward": 0.0} for s in SETTINGS}
    outputs, patches = {}, {}
    with torch.no_grad():
        embedded = [detector.embed(b) for b in batches]
        for r in range(args.rounds + 1):  # round 0 warms up and keeps the outputs
            for setting in SETTINGS:
                detector.knn_dtype = setting
                sync()
                start = time.perf_counter()
                dists = [detector.patch_scores(e)[0] for e in embedded]
                sync()
                knn_s = time.perf_counter() - start
                start = time.perf_counter()
                outs = [detector(b) for b in batches]
                sync()
                forward_s = time.perf_counter() - start
                if r == 0:
                    patches[setting] = torch.cat(dists).cpu()
                    outputs[setting] = (torch.cat([o.score for o in outs]).cpu().numpy(),
                                        torch.cat([o.map for o in outs]).cpu().numpy())
                else:
                    spent[setting]["knn"] += knn_s
                    spent[setting]["forward"] += forward_s
    detector.knn_dtype = "auto"
    rounds = max(1, args.rounds)
    rows = []
    for setting in SETTINGS:
        score, maps = outputs[setting]
        rows.append({
            "products": setting,
            "knn_s_per_batch": spent[setting]["knn"] / rounds / len(batches),
            "images_per_s": rounds * len(images) / max(spent[setting]["forward"], 1e-9),
            "image_auroc": image_auroc(labels, score),
            "pixel_auroc": pixel_auroc(masks, maps),
        })
    exact, low = patches["float32"], patches["bfloat16"]
    comparison = {
        "rank_correlation": float(spearmanr(outputs["float32"][0], outputs["bfloat16"][0])[0]),
        "same_patches": torch.isclose(low, exact, rtol=1e-5).float().mean().item(),
        "max_patch_ratio": (low / exact.clamp_min(1e-12)).max().item(),
        "knn_speedup": rows[0]["knn_s_per_batch"] / max(rows[1]["knn_s_per_batch"], 1e-9),
        "forward_speedup": rows[1]["images_per_s"] / max(rows[0]["images_per_s"], 1e-9),
    }
    print(f"patchcore {detector.config.backbone} at {args.size} px, bank of "
          f"{len(detector.memory_bank)} x {detector.memory_bank.shape[1]}, {len(images)} test "
          f"images, batch {args.batch_size}, on {args.device}; bf16 instructions on this CPU: "
          f"{cpu_bf16_products()}")
    print_table(rows, [("products", "products"), ("knn_s_per_batch", "kNN s/batch"),
                       ("images_per_s", "images/s"), ("image_auroc", "image AUROC"),
                       ("pixel_auroc", "pixel AUROC")])
    print_table([comparison], [(k, k) for k in comparison])
    result = {"machine": machine(), "args": vars(args), "rows": rows, "comparison": comparison,
              "cpu_bf16_products": cpu_bf16_products()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
