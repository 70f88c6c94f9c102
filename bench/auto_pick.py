"""How good is `--detector auto`'s pick? Per synthetic category: fit every candidate on good
images only, as the train job does (anomaly_core.training.train: the objective is image AUROC
on synthetic anomalies pasted into held-out normal images), then measure each candidate's
labelled image AUROC on the category's test split. Reports how often auto's pick (best
objective) is the best by labelled AUROC, and the mean AUROC given up when it is not.

ImageNet mobilenet_v2 (the offline package's weights): random weights give near-chance
detection, so the comparison would mean nothing.

    python -m bench.auto_pick [--categories carpet,wood,capsule,metal_nut] [--size 128]
        [--train 40] [--test 20] [--seeds 0,1] [--candidates "padim;patchcore;..."] [--out F]
    python -m bench.auto_pick --smoke    # CI: tiny, does it run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.common import machine, print_table, set_env, write_json


def main(argv: list[str] | None = None) -> dict:
    from anomaly_core.data.synthetic import CATEGORIES
    from anomaly_core.training.auto import DEFAULT_CANDIDATES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train", type=int, default=40, help="good images per category")
    p.add_argument("--test", type=int, default=20, help="test images per class (good, defect)")
    p.add_argument("--seeds", default="0,1", help="data seeds: each a separate case")
    p.add_argument("--out", default="bench-results/auto_pick.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.categories, args.size, args.train, args.test, args.seeds = "capsule", 64, 10, 4, "0"
        args.candidates = "padim:n_features=8;padim:n_features=16"
    set_env()
    from dataclasses import asdict, fields

    import numpy as np

    from anomaly_core.config import TrainingConfig
    from anomaly_core.data.datasets import ImageDataset, mvtec_records
    from anomaly_core.data.synthetic import generate
    from anomaly_core.detectors import detector_class, make_config
    from anomaly_core.detectors.tiling import input_size
    from anomaly_core.training.auto import parse_candidates, pick
    from anomaly_core.training.evaluate import predict
    from anomaly_core.training.metrics import image_auroc
    from anomaly_core.training.train import set_up_training, train_model
    from anomaly_core.training.validation import training_records

    candidates = parse_candidates(args.candidates)
    common = {"backbone": "mobilenet_v2", "image_size": args.size}
    rows, root = [], tempfile.mkdtemp(prefix="bench-auto-pick-")
    for seed in (int(s) for s in args.seeds.split(",")):
        for category in args.categories.split(","):
            data = os.path.join(root, f"{category}-{seed}")
            generate(data, categories=[category], size=args.size, n_train=args.train,
                     n_test_good=args.test, n_test_defect=args.test, seed=seed)
            train, val = training_records(data, category=category, seed=seed)
            test = mvtec_records(data, category, "test")
            labels = np.array([r.label for r in test])
            objective, labelled, seconds = {}, {}, {}
            for c in candidates:
                known = {f.name for f in fields(detector_class(c.detector).Config)}
                options = asdict(make_config(c.detector, **{
                    **{k: v for k, v in common.items() if k in known}, **dict(c.options)}))
                config = TrainingConfig(detector=c.detector, options=options, output=None,
                                        train=tuple(train), val=tuple(val), seed=seed)
                start = time.perf_counter()
                setup = set_up_training(config)
                assert setup.error is None, setup.error
                metrics = train_model(config, setup)
                seconds[c.label] = time.perf_counter() - start
                objective[c.label] = metrics.get("objective")
                scores = predict(setup.detector, ImageDataset(test, input_size(setup.detector)))
                labelled[c.label] = image_auroc(labels, scores["scores"])
            chosen = pick([(c, objective[c.label]) for c in candidates]).label
            best = max(labelled, key=labelled.get)
            rows.append({"category": category, "seed": seed, "auto_pick": chosen,
                         "best_by_labels": best, "hit": labelled[chosen] >= labelled[best],
                         "given_up": labelled[best] - labelled[chosen],
                         **{f"objective {k}": v for k, v in objective.items()},
                         **{f"auroc {k}": v for k, v in labelled.items()},
                         **{f"fit_s {k}": v for k, v in seconds.items()}})
    hits = [r["hit"] for r in rows]
    missed = [r["given_up"] for r in rows if not r["hit"]]
    summary = {"cases": len(rows), "auto_is_best": sum(hits), "share": sum(hits) / len(rows),
               "mean_auroc_given_up_when_not": float(np.mean(missed)) if missed else 0.0,
               "mean_auroc_given_up_overall": float(np.mean([r["given_up"] for r in rows]))}
    labels_ = [c.label for c in candidates]
    print(f"--detector auto on synthetic categories, {args.size} px, mobilenet_v2 (ImageNet), "
          f"{args.train} good training images, {args.test}+{args.test} test images")
    print_table(rows, [("category", "category"), ("seed", "seed"), ("auto_pick", "auto's pick"),
                       ("best_by_labels", "best by labels"), ("given_up", "AUROC given up"),
                       *[(f"objective {k}", f"obj {k}") for k in labels_],
                       *[(f"auroc {k}", f"AUROC {k}") for k in labels_]])
    print_table([summary], [(k, k) for k in summary])
    result = {"machine": machine(), "args": vars(args), "rows": rows, "summary": summary}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
