"""A plant in one Ray job: `python -m jobs.train --data ROOT --categories all --output ROOT`.

Each product (an MVTec category) gets its own model, registered under its name. Memory detectors
(single-pass statistics) fit as Ray tasks of a fraction of a GPU, several at once; gradient
detectors as concurrent Ray Train runs. A product that fails is recorded with its reason and the
others go on; a product whose data and configuration did not change since its last registered
version is reported up to date. The job ends with a table and exits 3 if a product failed.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

from anomaly_core import storage
from anomaly_core.config import TrainingConfig
from anomaly_core.training.fleet import ProductResult, fingerprint, products, table
from jobs.common import JobFailed, init_ray, log
from jobs.preflight import check_nodes, check_replicas
from jobs.trainer import TrainerSettings


def fit_product(config: TrainingConfig) -> str:
    """Ray task: one memory detector's fit in this process (anomaly_core.training.train)."""
    import ray

    from anomaly_core.training.train import set_up_training, train_model

    setup = set_up_training(config, gpu_ids=ray.get_gpu_ids())
    if setup.error:
        raise ValueError(setup.error)
    train_model(config, setup, node=ray.get_runtime_context().get_node_id())
    return config.output


def fit_config(args: argparse.Namespace, config: TrainingConfig) -> None:
    """One fit: a memory detector as a task of its own (N share a GPU, none needs a process
    group), a gradient detector as a Ray Train run with its checkpoints beside its artifact."""
    import ray

    from anomaly_core.detectors import detector_class
    from jobs import train

    if detector_class(config.detector).family == "memory":
        gpus = 1 / max(args.products_per_gpu, 1) if args.use_gpu else 0
        ray.get(ray.remote(fit_product).options(
            num_cpus=args.cpus_per_worker, num_gpus=gpus, max_retries=1,
            retry_exceptions=False).remote(config))
    else:
        train.fit_with_ray_train(replace(TrainerSettings.from_args(args), storage_path=storage.join(
            config.output, "checkpoints")), config)


def train_fleet(args: argparse.Namespace, detector: str, options: dict,
                candidates: list | None = None) -> dict:
    """Plan every product, fit what changed (with --detector auto, every candidate, keeping the
    best objective), register each new artifact; the table."""
    from anomaly_core.model import registry
    from anomaly_core.preflight import check_detector, check_writable
    from anomaly_core.training.validation import training_records
    from jobs import train

    for det, opts in ([(detector, options)] if not candidates else
                      [train.candidate_config(args, c, options, "")[:2] for c in candidates]):
        check_detector(det, opts)
    check_writable(args.output)
    init_ray(args.address)
    check_replicas(args.num_workers, args.cpus_per_worker, args.use_gpu, "--num-workers",
                   "--cpus-per-worker")
    # Weights every node must find: the detector's (each candidate's weights at fit time).
    check_nodes([args.data, args.val_data, args.output],
                **({} if candidates else {"detector": detector, "options": options}))
    results, todo = [], []
    for product in products(args.data, args.categories):
        result = ProductResult(product, detector=detector)
        results.append(result)
        try:
            if args.register:
                registry.check_product(product)
            train_set, val = training_records(args.data, category=product, seed=args.seed,
                                              val_fraction=args.val_fraction,
                                              val_data=args.val_data)
            product_args = argparse.Namespace(**{**vars(args), "category": product})
            digest = fingerprint(args.data, product,
                                 *train.fingerprinted(product_args, detector, options))
            latest = registry.latest(product) if args.register else None
            if latest and latest.tags.get("data_fingerprint") == digest:
                result.status, result.version = "up to date", latest.version
                result.artifact, result.detector = latest.source, latest.tags.get("detector")
                result.image_auroc = _float(latest.tags.get("val_image_auroc"))
                result.pixel_auroc = _float(latest.tags.get("val_pixel_auroc"))
                continue
            output = storage.join(args.output, product, digest[:12])
            configs = []
            for c in candidates or [None]:
                det, opts, out = ((detector, options, output) if c is None else
                                  train.candidate_config(args, c, options, output))
                configs.append(TrainingConfig.from_args(product_args, det, opts, train_set, val,
                                                        out))
            todo.append((result, product_args, configs, digest))
        except (ValueError, storage.StorageError, FileNotFoundError) as exc:
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
    log.info("fleet of %d products: %d to train with %s, %d up to date, %d failed", len(results),
             len(todo), detector, sum(r.status == "up to date" for r in results),
             sum(r.status == "failed" for r in results))

    def run(item) -> None:
        result, product_args, configs, digest = item
        start = time.perf_counter()
        try:
            fits = []
            for config in configs:
                fit_config(args, config)
                fits.append((config, train.summarize(product_args, config,
                                                     time.perf_counter() - start)))
            (config, summary), auto = fits[0], {}
            if candidates:
                config, summary, auto = train.keep_best(candidates, fits)
                result.detector = auto["auto_pick"]
            if args.register:
                summary["registered"] = train.register(product_args, result.product, config,
                                                       summary, data_fingerprint=digest, auto=auto)
                result.version = summary["registered"]["version"]
                train.write_summary(config.output, summary)
            validation = summary["validation_metrics"]  # labelled, else synthetic anomalies
            result.image_auroc = validation.get("image_auroc", validation.get("val_image_auroc"))
            result.pixel_auroc = validation.get("pixel_auroc", validation.get("val_pixel_auroc"))
            result.status, result.artifact = "trained", config.output
        except Exception as exc:  # one product's failure (OOM, unreadable data) is its own
            log.warning("%s failed: %s", result.product, exc)
            result.status, result.reason = "failed", f"{type(exc).__name__}: {str(exc)[:500]}"
        result.wall_s = round(time.perf_counter() - start, 1)

    with ThreadPoolExecutor(max(args.max_concurrent, 1)) as pool:
        list(pool.map(run, todo))
    print(table(results))
    summary = {"detector": detector, "products": [asdict(r) for r in results],
               "failed": [r.product for r in results if r.status == "failed"]}
    storage.write_bytes(storage.join(args.output, "fleet_summary.json"),
                        json.dumps(summary, indent=2, default=str).encode())
    if summary["failed"]:
        raise JobFailed(f"{len(summary['failed'])} of {len(results)} products failed: "
                        f"{', '.join(summary['failed'])}; the others are registered (see above)")
    return summary


def _float(text: str | None) -> float | None:
    return float(text) if text else None
