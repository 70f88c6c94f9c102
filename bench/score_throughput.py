"""Scoring throughput: a bare in-process loop (decode + model + rows, no Ray) against the Ray Data
job (jobs/score.py) on the same images and model, in one run. Prints a table.

    python bench/score_throughput.py [--images 200] [--image-size 128] [--source-size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bare_loop(model: str, source: str, output: str, batch_size: int, rows_per_file: int) -> float:
    """images/s of the job's own stages called in one process: no Ray, no parallelism."""
    import numpy as np

    from anomaly_core.runs import open_run, pending
    from jobs.score import ScoringActor, read_images, write_rows

    start = time.perf_counter()
    actor = ScoringActor(model, None, use_gpu=False)
    artifact = actor.artifact
    run = open_run(source=source, output=output, model=artifact.name,
                   model_version=artifact.model_version, extensions=[".png"])
    todo = pending(run).to_pydict()
    fields, cal = run.describe(), artifact.calibration.to_dict()
    done: list[dict] = []
    for i in range(0, len(todo["uri"]), batch_size):
        batch = {k: v[i : i + batch_size] for k, v in todo.items()}
        done.append(actor(read_images(batch, artifact.input_size, 100_000_000, None)))
        if sum(len(d["uri"]) for d in done) >= rows_per_file or i + batch_size >= len(todo["uri"]):
            merged = {k: np.concatenate([np.asarray(d[k]) for d in done]) for k in done[0]}
            write_rows(merged, fields, cal, None)
            done = []
    return len(todo["uri"]) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=128, help="model input size")
    p.add_argument("--source-size", type=int, default=256, help="size of the image files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--rows-per-file", type=int, default=256)
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from anomaly_core.artifact import ModelArtifact
    from anomaly_core.data.datasets import ImageDataset, folder_records, mvtec_records
    from anomaly_core.data.synthetic import generate
    from anomaly_core.detectors import build_detector
    from anomaly_core.evaluate import calibrate, predict
    from anomaly_core.fit import fit
    from jobs import score

    work = tempfile.mkdtemp(prefix="bench_score_")
    data = os.path.join(work, "data")
    generate(data, categories=["capsule"], size=args.source_size, n_train=40,
             n_test_good=args.images // 2, n_test_defect=max(1, args.images // 8))
    size = (args.image_size, args.image_size)
    detector = build_detector("padim", backbone="mobilenet_v2", image_size=args.image_size)
    fit(detector, ImageDataset(mvtec_records(data, "capsule", "train"), size), batch_size=16)
    pred = predict(detector, ImageDataset(mvtec_records(data, "capsule", "train")[:8], size))
    model = os.path.join(work, "model")
    ModelArtifact(detector, calibrate(pred["scores"], pred["maps"], pred["labels"])[0]).save(model)
    uris = [r.uri for r in folder_records(os.path.join(data, "capsule", "test"))]

    source = os.path.join(data, "capsule", "test")
    bare = bare_loop(model, source, os.path.join(work, "bare"), args.batch_size, args.rows_per_file)
    result = score.main(["--model", model, "--input", source, "--output", os.path.join(work, "scores"),
                         "--batch-size", str(args.batch_size), "--num-actors", str(args.num_actors),
                         "--rows-per-file", str(args.rows_per_file)])
    ray_rate = result["images_per_s"]
    print(f"\nscoring {len(uris)} images ({args.source_size}px files, padim mobilenet_v2 at "
          f"{args.image_size}px), {os.cpu_count()} cores")
    print(f"{'pipeline':<32}{'images/s':>10}{'ratio':>8}")
    print(f"{'bare loop (no Ray)':<32}{bare:>10.1f}{1.0:>8.2f}")
    print(f"{'Ray Data job (jobs/score.py)':<32}{ray_rate:>10.1f}{ray_rate / bare:>8.2f}")


if __name__ == "__main__":
    main()
