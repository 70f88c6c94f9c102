"""Score every image in a folder or s3:// prefix with a trained artifact into Parquet, with Ray Data.

    python -m jobs.score --model ARTIFACT_URI --input DIR_OR_S3 --output DIR_OR_S3

Pipeline: list once -> read+decode+resize (CPU tasks) -> model (actor pool) -> rows (CPU tasks)
-> Parquet under <output>/dt=YYYY-MM-DD/model=NAME/. Unreadable images become rows with `error`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jobs.common import add_cluster_flags, init_ray, log, run_job, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="artifact directory written by jobs.train")
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of images (recursive)")
    p.add_argument("--output", required=True, help="Parquet output root (local or s3://)")
    p.add_argument("--extensions", default=".png,.jpg,.jpeg,.bmp,.tif,.tiff",
                   help="comma-separated file extensions to score")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas (actor pool size)")
    p.add_argument("--cpus-per-actor", type=float, default=1)
    add_cluster_flags(p)
    return p.parse_args(argv)


def read_images(batch: dict, size: tuple[int, int], s3_endpoint: str | None) -> dict:
    """CPU task: bytes -> decoded, resized image per row; failures keep the row with `error`."""
    from anomaly_core.scoring import read_image

    rows = [read_image(str(uri), size, s3_endpoint=s3_endpoint) for uri in batch["uri"]]
    blank = np.zeros((3, *size), dtype=np.float32)
    # Ray turns an all-None column into floats; carry "" and -1 for missing, nulls again in to_rows.
    out = {k: [r[k] or "" for r in rows] for k in ("uri", "etag", "error")}
    out.update({k: [r[k] or -1 for r in rows] for k in ("size_bytes", "width", "height")})
    out["image"] = np.stack([blank if r["image"] is None else r["image"] for r in rows])
    return out


class ScoringActor:
    """Loads the artifact once, then runs the model on each batch of decoded images."""

    def __init__(self, model_uri: str, s3_endpoint: str | None, use_gpu: bool) -> None:
        from anomaly_core.artifact import ModelArtifact

        self.device = "cuda" if use_gpu else "cpu"
        self.artifact = ModelArtifact.load(model_uri, s3_endpoint=s3_endpoint, device=self.device)

    def __call__(self, batch: dict) -> dict:
        from anomaly_core.scoring import run_model

        ok = [i for i, e in enumerate(batch["error"]) if not e]
        n, (h, w) = len(batch["uri"]), self.artifact.input_size
        scores = np.full(n, np.nan, dtype=np.float32)
        maps = np.zeros((n, h, w), dtype=np.float32)
        if ok:
            scores[ok], maps[ok] = run_model(self.artifact, [batch["image"][i] for i in ok], device=self.device)
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(raw_score=scores, raw_map=maps)
        return out


def to_rows(batch: dict, calibration: dict, model: str, model_version: str):
    """CPU task: raw outputs -> schema rows (normalized score, mask and heatmap PNGs)."""
    from anomaly_core.evaluate import Calibration
    from anomaly_core.schema import score_table, utc_now
    from anomaly_core.scoring import outputs

    cal, now, rows = Calibration(**calibration), utc_now(), []
    for i, uri in enumerate(batch["uri"]):
        row = {k: batch[k][i] for k in ("uri", "etag", "size_bytes", "width", "height", "error")}
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        row = {k: None if v in ("", -1) else v for k, v in row.items()}
        row.update(model=model, model_version=model_version, scored_at=now)
        if row["error"] is None:
            size = (int(row["height"]), int(row["width"]))
            row.update(outputs(float(batch["raw_score"][i]), batch["raw_map"][i], cal, size))
        rows.append(row)
    return score_table(rows)


def _parquet_files(root: str, s3_endpoint: str | None) -> list[str]:
    from anomaly_core import storage

    if not storage.exists(root, s3_endpoint=s3_endpoint):
        return []
    return storage.list_files(root, extensions=[".parquet"], s3_endpoint=s3_endpoint)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    from anomaly_core import storage
    from anomaly_core.artifact import ModelArtifact
    from anomaly_core.schema import partition_path, utc_now

    # Fail before any work if the model or the input cannot be read.
    artifact = ModelArtifact.load(args.model, s3_endpoint=args.s3_endpoint)
    extensions = [e if e.startswith(".") else f".{e}" for e in args.extensions.split(",") if e]
    uris = storage.list_files(args.input, extensions=extensions, s3_endpoint=args.s3_endpoint)
    if not uris:
        raise SystemExit(f"no images with extensions {extensions} under {args.input}")
    out_dir = partition_path(args.output, artifact.name, utc_now())
    log.info("scoring %d images from %s with %s@%s into %s", len(uris), args.input,
             artifact.name, artifact.model_version, out_dir)
    init_ray(args.address)
    import ray

    start = time.perf_counter()
    ds = ray.data.from_items([{"uri": u} for u in uris])
    ds = ds.map_batches(read_images, batch_size=args.batch_size,
                        fn_kwargs={"size": artifact.input_size, "s3_endpoint": args.s3_endpoint})
    ds = ds.map_batches(
        ScoringActor,
        fn_constructor_kwargs={"model_uri": args.model, "s3_endpoint": args.s3_endpoint,
                               "use_gpu": args.use_gpu},
        compute=ray.data.ActorPoolStrategy(size=args.num_actors),
        batch_size=args.batch_size,
        num_cpus=args.cpus_per_actor,
        num_gpus=1 if args.use_gpu else 0,
    )
    ds = ds.map_batches(to_rows, batch_size=args.batch_size, fn_kwargs={
        "calibration": artifact.calibration.to_dict(), "model": artifact.name,
        "model_version": artifact.model_version})
    fs, path = storage.filesystem(out_dir, s3_endpoint=args.s3_endpoint)
    before = set(_parquet_files(out_dir, args.s3_endpoint))
    ds.write_parquet(path, filesystem=fs)
    wall = time.perf_counter() - start
    import pyarrow.dataset as pads

    # Count this run's files only: the partition may hold earlier runs of the same day.
    written = [f for f in _parquet_files(out_dir, args.s3_endpoint) if f not in before]
    paths = [storage.filesystem(f, s3_endpoint=args.s3_endpoint)[1] for f in written]
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["error"])
    errors = table.num_rows - table["error"].null_count
    summary = {"images": len(uris), "rows": table.num_rows, "scored": table.num_rows - errors,
               "errors": errors, "output": out_dir, "wall_s": round(wall, 1),
               "images_per_s": round(len(uris) / wall, 2), "model": artifact.name,
               "model_version": artifact.model_version}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_job(main)
