"""A plant's nightly work as one job against one job per product, on the same images and models.
Prints a table and writes JSON.

Per detector (each product's model registered in its own MLflow store under the work folder;
every job a fresh `python -m jobs...` process on one running Ray cluster, as `ray job submit`
would run it; wall time from the process's start to its exit):
  fleet      jobs.score --fleet over every product's images (product=<name>/ folders)
  separate   jobs.score --model models:/<product>@champion, once per product, one after another
  one model  jobs.score --model <one artifact> over the same images: the floor for the fleet
  budget     jobs.score --fleet with --models-memory-mb for --resident models of --products:
             models loaded and evicted per 1,000 images, images/s
  train      jobs.train --categories all (concurrent fits) against one jobs.train per product

    python -m bench.fleet [--products 15] [--images 1000] [--detectors padim,patchcore]
        [--set backbone=mobilenet_v2 --set image_size=128] [--resident 5] [--train-images 24]
    python -m bench.fleet --smoke   # CI: 2 products of a few images, does it run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from anomaly_core.config import parse_overrides
from bench.common import (
    RAY_ENV,
    REPO,
    bench_artifact,
    detector_at_defaults,
    image_set,
    machine,
    module_command,
    print_table,
    set_env,
    write_json,
)

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the CLI of this environment's Ray


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--products", type=int, default=15)
    p.add_argument("--images", type=int, default=1000, help="images per product")
    p.add_argument("--source-size", type=int, default=128, help="side of the image files (px)")
    p.add_argument("--detectors", default="padim,patchcore")
    p.add_argument("--set", action="append", default=None,
                   help="detector option key=value (default: backbone=mobilenet_v2, "
                        "image_size=128: 15,000 images at the defaults take hours on 2 cores)")
    p.add_argument("--resident", type=int, default=5, help="models the budget run's actor holds")
    p.add_argument("--train-images", type=int, default=24, help="good images per product to fit")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--extra", default="",
                   help="more jobs.score flags for every scoring job, e.g. --extra=--use-gpu")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster the jobs run on (default: RAY_ADDRESS, else one started here)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="bench-results/fleet.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.products, args.images, args.train_images, args.resident = 2, 6, 6, 1
        args.detectors = "padim"
    sets = parse_overrides(args.set or ["backbone=mobilenet_v2", "image_size=128"])
    set_env()
    work = tempfile.mkdtemp(prefix="bench-fleet-")
    started = None if args.address else start_ray(work)
    address = args.address or started
    try:
        root = plant_images(work, args.products, args.images, args.source_size)
        train_root = None if args.skip_training else plant_training_data(
            work, args.products, args.train_images, args.source_size)
        rows = []
        for detector in args.detectors.split(","):
            rows += bench_detector(detector, sets, args, work, root, train_root, address)
    finally:
        if started:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, [("detector", "detector"), ("case", "case"), ("jobs", "jobs"),
                       ("images", "images"), ("wall_s", "wall s"), ("images_per_s", "images/s"),
                       ("vs_fleet", "/ fleet"), ("loads", "loads"),
                       ("evictions_per_1000", "evictions/1000 images")])
    result = {"machine": machine(), "products": args.products, "images_per_product": args.images,
              "sets": sets, "rows": rows}
    write_json(args.out, result)
    return result


def start_ray(work: str) -> str:
    """A local Ray head on loopback for the jobs to share; its address."""
    from tests.helpers import free_port

    port = free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--disable-usage-stats", f"--temp-dir={work}/ray"], check=True,
                   capture_output=True, env={**os.environ, **RAY_ENV})
    return f"127.0.0.1:{port}"


def plant_images(work: str, products: int, images: int, size: int) -> str:
    """<work>/plant/product=pNN/<image>.png: the same synthetic images under every product
    (hard links: decoding costs the same)."""
    files = image_set(os.path.join(work, "source"), images, size)
    root = os.path.join(work, "plant")
    for i in range(products):
        folder = os.path.join(root, f"product={product_name(i)}")
        os.makedirs(folder)
        for f in files:
            os.link(f, os.path.join(folder, os.path.basename(f)))
    return root


def plant_training_data(work: str, products: int, n_train: int, size: int) -> str:
    """An MVTec-layout root with one category per product (a copy of one synthetic capsule)."""
    from anomaly_core.data.synthetic import generate

    source = os.path.join(work, "train-source")
    generate(source, categories=["capsule"], size=size, n_train=n_train, n_test_good=4,
             n_test_defect=2)
    root = os.path.join(work, "train")
    for i in range(products):
        shutil.copytree(os.path.join(source, "capsule"), os.path.join(root, product_name(i)),
                        copy_function=os.link)
    return root


def product_name(i: int) -> str:
    return f"p{i:02d}"


def run_job(module: str, *args: str, env: dict[str, str]) -> tuple[float, str]:
    """A job in a fresh process: its wall seconds and its output; fails on a non-zero exit."""
    start = time.perf_counter()
    done = subprocess.run(module_command(module, *args), cwd=REPO, capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return wall, done.stdout


def bench_detector(detector: str, sets: dict, args, work: str, root: str, train_root: str | None,
                   address: str) -> list[dict]:
    from anomaly_core.model import registry
    from anomaly_core.model.artifact import WEIGHTS_FILE
    from anomaly_core.model.info import read_metadata

    home = os.path.join(work, detector)
    env = {**os.environ, **RAY_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]  # the registrations below
    model = detector_at_defaults(detector, "cpu", 32, sets)
    artifacts = []
    for i in range(args.products):
        path = os.path.join(home, "models", product_name(i))
        bench_artifact(model).save(path)
        registry.log_training(product_name(i), source=path, detector=detector, params={},
                              metrics={}, history=[], summary={},
                              tags={"model_version": read_metadata(path)["model_version"]})
        artifacts.append(path)
    weights_mb = os.path.getsize(os.path.join(artifacts[0], WEIGHTS_FILE)) / 2**20
    common = ["--batch-size", str(args.batch_size), "--address", address,
              "--progress-every", "60", *args.extra.split()]
    total = args.products * args.images

    def score(case: str, *flags: str, jobs: int = 1) -> dict:
        out = os.path.join(home, case.replace(" ", "-"))
        wall, stdout = run_job("jobs.score", *flags, "--output", out, *common, env=env)
        summary = _last_summary(out)
        loads = (summary or {}).get("models_loaded") or {}
        return {"detector": detector, "case": case, "jobs": jobs, "images": total,
                "wall_s": wall, "images_per_s": total / wall, "loads": loads.get("loads"),
                "evictions_per_1000": (loads["evictions"] * 1000 / total) if loads else None}

    rows = [score("fleet", "--fleet", "--input", root)]
    rows.append(score("one model", "--model", artifacts[0], "--input", root))
    separate = [score("separate", "--model", f"models:/{product_name(i)}@champion", "--input",
                      os.path.join(root, f"product={product_name(i)}"))
                for i in range(args.products)]
    wall = sum(r["wall_s"] for r in separate)
    rows.append({**separate[0], "jobs": args.products, "wall_s": wall,
                 "images_per_s": total / wall, "loads": None, "evictions_per_1000": None})
    budget = f"{weights_mb * (args.resident + 0.5):.1f}"
    rows.append(score(f"budget {args.resident} of {args.products}", "--fleet", "--input", root,
                      "--models-memory-mb", budget))
    if train_root:
        rows += bench_training(detector, sets, args, home, train_root, address, env)
    fleet = rows[0]["wall_s"]
    for row in rows:
        if not row["case"].startswith("train"):
            row["vs_fleet"] = row["wall_s"] / fleet
    return rows


def bench_training(detector: str, sets: dict, args, home: str, root: str, address: str,
                   env: dict[str, str]) -> list[dict]:
    """jobs.train --categories all against one jobs.train per product."""
    flags = ["--detector", detector, "--address", address, "--no-register", "--batch-size", "8",
             *(x for k, v in sets.items() for x in ("--set", f"{k}={v}")), "--set",
             "weights=random"]
    fleet, _ = run_job("jobs.train", "--data", root, "--categories", "all", "--output",
                       os.path.join(home, "train-fleet"), *flags, env=env)
    separate = sum(run_job("jobs.train", "--data", root, "--category", product_name(i),
                           "--output", os.path.join(home, "train-one", product_name(i)),
                           *flags, env=env)[0] for i in range(args.products))
    images = args.products * args.train_images
    return [{"detector": detector, "case": "train fleet", "jobs": 1, "images": images,
             "wall_s": fleet, "images_per_s": images / fleet, "vs_fleet": 1.0},
            {"detector": detector, "case": "train separate", "jobs": args.products,
             "images": images, "wall_s": separate, "images_per_s": images / separate,
             "vs_fleet": separate / fleet}]


def _last_summary(out: str) -> dict | None:
    """The _SUCCESS.json of the run under `out` (one run per output here)."""
    import glob
    import json

    found = glob.glob(os.path.join(out, "_runs", "*", "_SUCCESS.json"))
    return json.loads(open(found[0]).read()) if found else None


if __name__ == "__main__":
    main()
