"""Score every image in a folder, s3:// prefix or manifest into Parquet: with one model, or
with each product's registered model (--fleet).

    python -m jobs.score --model MODEL --input DIR_OR_S3 --output DIR_OR_S3 [--incremental]
    python -m jobs.score --fleet [ALIAS] --input DIR_OR_S3 --output DIR_OR_S3 [--product-from ..]

List once -> read + decode + resize (CPU tasks) -> model (actor pool; models resident by
product) -> rows and atomic part files (CPU tasks) -> <output>/dt=D/product=P/version=V/.
Starting the same command again resumes the run; unreadable images, and images whose product
has no model, become rows with `error` and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import re
import time

from anomaly_core import storage
from anomaly_core.config import ScoringConfig
from anomaly_core.errors import ArtifactError
from anomaly_core.model.calibration import Calibration
from anomaly_core.scoring import models, runs
from anomaly_core.scoring.model_stage import ResidentModels
from anomaly_core.scoring.rows import read_images, write_part
from jobs.common import (
    JobFailed,
    add_cluster_flags,
    init_ray,
    log,
    redacted,
    run_job,
    setup_logging,
    streaming_context,
    use_storage_flags,
)
from jobs.nodes import NodeWatch, next_scoring_attempt, node_loss_errors
from jobs.preflight import check_nodes, check_replicas, check_resources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model",
                       help="models:/<product>@champion (or @alias, /version) from the registry, "
                            "or an artifact directory written by jobs.train")
    which.add_argument("--fleet", nargs="?", const="champion", metavar="ALIAS",
                       help="score each image with its product's registered model under ALIAS "
                            "(default champion); see --product-from")
    p.add_argument("--product-from",
                   help="with --fleet, each image's product: hive:KEY (a KEY=<product> folder, "
                        "default hive:product), folder:N (the N-th folder under --input) or "
                        "column (the manifest's `product` column, the default with --manifest)")
    p.add_argument("--models-memory-mb", type=float, default=8192,
                   help="weights each model actor keeps loaded (MiB); the least recently used "
                        "product's model is evicted first")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder or s3://bucket/prefix of images (recursive)")
    source.add_argument("--manifest", help="Parquet or CSV file with a `uri` column (optional etag)")
    p.add_argument("--inventory",
                   help="S3 Inventory manifest.json (CSV or Parquet report) to take --input's "
                        "images from instead of listing it: for prefixes of tens of millions")
    p.add_argument("--since", help="YYYY-MM-DD: with --date-prefix, list only the date folders "
                                   "from this day to today (date-partitioned inputs)")
    p.add_argument("--date-prefix",
                   help="strftime pattern of the date folders under --input, e.g. %%Y/%%m/%%d/ "
                        "or dt=%%Y-%%m-%%d/ (with --since)")
    p.add_argument("--output", required=True, help="Parquet output root (local or s3://)")
    p.add_argument("--extensions", default=".png,.jpg,.jpeg,.bmp,.tif,.tiff",
                   help="comma-separated file extensions to score (folder/prefix input)")
    p.add_argument("--incremental", action="store_true",
                   help="skip images this model version already scored with the same etag")
    p.add_argument("--run-id", help="resume this run (default: one per command, model and day)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--rows-per-file", type=int, default=256, help="rows per Parquet part file")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas (actor pool size)")
    p.add_argument("--cpus-per-actor", type=float, default=1)
    p.add_argument("--actor-start-timeout", type=float, default=600,
                   help="seconds to wait for every model actor to load its model before any "
                        "image is sent, so all replicas share the work from the start")
    p.add_argument("--model-threads", type=int,
                   help="CPU only: each model actor's torch threads (default: its "
                        "--cpus-per-actor); e.g. 2 cores: --cpus-per-actor 0.5 --model-threads 2")
    p.add_argument("--decode-cpus", type=float, default=1, help="CPUs per decode task")
    p.add_argument("--row-cpus", type=float,
                   help="CPUs per row task (default: --decode-cpus); rows stream only if a "
                        "row task fits beside the model actors on a node")
    p.add_argument("--stall-timeout", type=float, default=300,
                   help="seconds without progress (a lost node's batches waiting on an actor "
                        "that cannot restart) before the images not yet written start again")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="new attempts after lost nodes before the job stops (exit 4; rerun)")
    p.add_argument("--decode-memory-mb", type=float, default=512,
                   help="memory Ray reserves per decode task (MiB); raise it for very large images")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="networks' precision (scores stay float32): auto = on a GPU fp16 for "
                        "the detectors measured faster in 16 bits (padim, vit_knn, simplenet) "
                        "and fp32 for the others; fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each actor")
    p.add_argument("--batches-in-flight", type=int,
                   help="batches each model actor runs at once, on their own CUDA streams so "
                        "copies overlap compute (default: 2 with --use-gpu, else 1)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode plain JPEGs in the model actor on its device (nvJPEG with "
                        "--use-gpu); other files still decode on CPU tasks")
    p.add_argument("--resize-on-device", action="store_true",
                   help="decode tasks ship images at their decoded size and the model actor "
                        "resizes them on its device (antialiased bilinear, within a grey level "
                        "of the CPU resize): 2 ms less CPU per 512 px image, 4x the bytes "
                        "through the object store")
    p.add_argument("--render-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="resize, threshold and quantize the maps in the model actor (on the GPU) "
                        "instead of in the row tasks, whose CPUs bound a GPU node (default: on "
                        "with --use-gpu)")
    p.add_argument("--mask-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="mask/heatmap size (default: each image's own size)")
    p.add_argument("--heatmaps", choices=("all", "anomalous", "none"), default="anomalous",
                   help="rows that get a heatmap PNG: all, anomalous (at or above the image "
                        "threshold; the default) or none; every row gets its mask. The report's "
                        "pixel metrics count only rows with heatmaps: pass all to evaluate")
    p.add_argument("--max-pixels", type=int, default=100_000_000,
                   help="refuse images with more pixels (decompression bombs)")
    p.add_argument("--max-error-rate", type=float, default=1.0,
                   help="exit 3 when more than this share of images could not be read")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    add_cluster_flags(p)
    args = p.parse_args(argv)
    if (args.product_from and not args.fleet) or (args.product_from == "column" and not args.manifest):
        p.error("--product-from says where --fleet finds each image's product (column: in "
                "--manifest); pass --fleet")
    if args.fleet and not args.product_from:
        args.product_from = "column" if args.manifest else "hive:product"
    if args.batch_size < 1 or args.rows_per_file < 1 or args.num_actors < 1:
        p.error("--batch-size, --rows-per-file and --num-actors must be at least 1")
    if args.row_cpus is None:
        args.row_cpus = args.decode_cpus
    if args.stall_timeout <= 0 or args.max_restarts < 0:
        p.error("--stall-timeout must be positive and --max-restarts at least 0")
    if args.batches_in_flight is None:
        args.batches_in_flight = 2 if args.use_gpu else 1
    if args.render_on_device is None:
        args.render_on_device = args.use_gpu
    if args.model_threads is not None and args.model_threads < 1:
        p.error("--model-threads must be at least 1")
    if args.batches_in_flight < 1 or args.decode_memory_mb <= 0:
        p.error("--batches-in-flight must be at least 1 and --decode-memory-mb positive")
    if not 0.0 <= args.max_error_rate <= 1.0:
        p.error("--max-error-rate is a share between 0 and 1")
    if bool(args.since) != bool(args.date_prefix):
        p.error("--since and --date-prefix go together: the day to start from and the pattern "
                "of the date folders under --input, e.g. --since 2026-11-29 --date-prefix %Y/%m/%d/")
    if (args.inventory or args.since) and not args.input:
        p.error("--inventory and --since filter an --input prefix; pass --input s3://bucket/prefix")
    return args


class ScoringActor(ResidentModels):
    """The model stage as a Ray Data actor: models loaded once, its Ray node in each row."""

    def __init__(self, config: ScoringConfig) -> None:
        import ray

        super().__init__(config, node=ray.get_runtime_context().get_node_id())


def write_rows(batch: dict, run: runs.RunAttempt, calibrations: dict[str, Calibration],
               mask_size, heatmaps: str) -> dict:
    """CPU task: the row stage (anomaly_core.scoring.rows.write_part), and where it ran."""
    import ray

    return {**write_part(batch, run, calibrations, mask_size, heatmaps),
            "rows_node": [ray.get_runtime_context().get_node_id()]}


def scoring_dataset(todo, run: runs.ScoreRun, args: argparse.Namespace, config: ScoringConfig,
                    infos: dict, actors: tuple[int, int]):
    """The pipeline over `todo`: decode tasks -> (least, most) model actors -> row tasks."""
    import ray

    blocks = runs.input_blocks(todo, ray.cluster_resources().get("CPU", 1), args.batch_size)
    log.info("%d inputs to Ray Data in %d blocks", todo.num_rows, len(blocks))
    ds = ray.data.from_arrow(blocks).map_batches(
        read_images, batch_size=args.batch_size, fn_kwargs={
            "sizes": config.input_sizes, "max_pixels": config.max_pixels,
            "keep_jpeg": config.keep_jpeg, "resize": not config.resize_on_device},
        # A memory reservation the model actor does not have keeps Ray Data from fusing
        # decoding into the actor (it fuses maps with equal resources): decoding scales
        # out on CPU tasks, the actor only runs the model.
        num_cpus=args.decode_cpus, memory=int(args.decode_memory_mb * 2**20),
    )
    ds = ds.map_batches(
        ScoringActor, fn_constructor_args=(config,),
        compute=ray.data.ActorPoolStrategy(
            min_size=actors[0], max_size=actors[1],
            max_concurrent_calls_per_actor=args.batches_in_flight,
            enable_true_multi_threading=args.batches_in_flight > 1),
        batch_size=args.batch_size, num_cpus=args.cpus_per_actor,
        num_gpus=1 if args.use_gpu else 0,
    )
    return ds.map_batches(write_rows, batch_size=args.rows_per_file, num_cpus=args.row_cpus,
                          fn_kwargs={"run": run.describe(), "mask_size": config.mask_size,
                                     "heatmaps": config.heatmaps,
                                     "calibrations": {p: i.calibration for p, i in infos.items()}})


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    use_storage_flags(args)

    t0 = time.perf_counter()
    # Fail before any work when a model, the input or the output cannot be used. The driver
    # reads model.json only: the weights (gigabytes for PaDiM) are loaded by the actors alone.
    chosen = None if args.fleet else models.single_model(args.model)
    if chosen and (problems := models.read_artifacts((chosen,))[1]):
        raise ArtifactError(problems[chosen.product])
    if args.address:  # a cluster: its nodes must see every local path before anything is written
        init_ray(args.address)
        check_nodes([args.input, args.manifest, args.output, chosen and chosen.uri])
    extensions = [e if e.startswith(".") else f".{e}" for e in args.extensions.split(",") if e]
    run = runs.open_run(
        source=args.input or args.manifest, manifest=bool(args.manifest), output=args.output,
        inventory=args.inventory, since=args.since, date_prefix=args.date_prefix,
        models=[chosen] if chosen else models.fleet_models(args.fleet), extensions=extensions,
        incremental=args.incremental, run_id=args.run_id, product_from=args.product_from,
    )
    infos, problems = models.read_artifacts(run.models)  # a fleet's unusable: error rows
    todo = runs.publish_without_model(run, runs.pending(run), set(infos), lambda p: (
        models.no_model_reason(p, args.fleet or "champion", problems)))
    t_plan = time.perf_counter() - t0
    log.info("run %s (%s), planned in %.2f s: %d images listed, %d to score; %s; rows to %s; "
             "options %s", run.run_id,
             f"resumed, started {run.created_at}" if run.resumed else "new", t_plan,
             run.inputs.num_rows, todo.num_rows,
             ", ".join(f"{m.product}@{m.version}" for m in run.models) or "no models",
             storage.join(run.output, f"dt={run.day}"), json.dumps(redacted(vars(args))))
    if todo.num_rows:
        init_ray(args.address)

        if args.address and run.fleet:
            check_nodes([info.uri for info in infos.values()])
        check_replicas(args.num_actors, args.cpus_per_actor, args.use_gpu, "--num-actors",
                       "--cpus-per-actor")
        decode_memory = int(args.decode_memory_mb * 2**20)
        check_resources({"CPU": args.decode_cpus, "memory": decode_memory}, 1,
                        f"--decode-cpus {args.decode_cpus:g} with --decode-memory-mb "
                        f"{args.decode_memory_mb:g}", "lower --decode-cpus or --decode-memory-mb")

        pixels = max(h * w for h, w in (i.input_size for i in infos.values()))
        with streaming_context(args.actor_start_timeout, args.batch_size * 3 * pixels * 4,
                               args.stall_timeout):
            t1 = time.perf_counter()
            config = ScoringConfig.from_args(args, {p: (i.uri, i.input_size)
                                                    for p, i in infos.items()})
            progress = runs.Progress(todo.num_rows, args.progress_every, log.info)
            actors, restarts = (args.num_actors, args.num_actors), []
            # Attempts of the run: a new one over the images not yet written when a lost node
            # stops the pipeline (jobs/nodes.py); the part files written stay.
            with NodeWatch(progress.state, progress.node_lost, what="scoring") as watch:
                while True:
                    ds = scoring_dataset(todo, run, args, config, infos, actors)
                    try:
                        nodes = runs.publish_all(run, ds.iter_rows(), progress)
                        break
                    except node_loss_errors() as exc:
                        run, todo, actors = next_scoring_attempt(run, args, exc, restarts, watch,
                                                                 progress)
            t_score, t_first = time.perf_counter() - t1, progress.first
            lost, drained = watch.lost, watch.draining
            # The operators as Ray ran them ("A->B" when fused): decoding stays out of the actor.
            stages = re.findall(r"^Operator \d+ (\S.*?):", ds.stats(), re.M)
    else:
        t_score, t_first, stages, nodes, progress = 0.0, None, [], {}, runs.Progress(0, 0)
        restarts, lost, drained = [], [], []
    # first_rows: from the dataset's creation to the first part file (actors' start included)
    summary = runs.finish(run, {"plan": t_plan, "first_rows": t_first, "score": t_score,
                          "total": time.perf_counter() - t0},
                          {"images_per_s": round(todo.num_rows / t_score, 2) if t_score else None,
                           # the Ray nodes that ran the model actors and wrote the rows
                           "nodes": nodes, "stages": stages, **progress.counts,
                           "nodes_lost": lost, "nodes_drained": drained,
                           "restarts": restarts},
                          # what each product's rows were scored with; the report reads these
                          {m.product: models.product_summary(m, infos[m.product])
                           for m in run.models if m.product in infos})
    print(runs.summary_text(run, summary))
    rate = summary["errors"] / max(summary["rows"], 1)
    if rate > args.max_error_rate:
        raise JobFailed(f"error rate {rate:.1%} is above --max-error-rate {args.max_error_rate:.1%}; "
                         f"the rows are written, see the `error` column under {args.output}")
    return summary


if __name__ == "__main__":
    run_job(main)
