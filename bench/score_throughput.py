"""The scoring job (jobs/score.py on Ray Data) against the node's ceilings, on the same images
and model, in one run. Prints a table and writes JSON.

  ceilings  CPU (decode + rows on all cores, bench.ceilings) and model (uint8 batches on the
            device, the job's precision). Where the job renders the maps in the model actor
            (--render-on-device, its default on a GPU) the rows ceiling leaves rendering out
            and the model ceiling includes it.
  bound     on a GPU node the stages use different resources: min(cpu, model). On a CPU-only
            node the model shares the cores with decoding and rows: 1/(1/cpu + 1/model).
  job       images/s of the job from dataset creation to its last part file (Ray already up;
            actor start-up and model loading included), and its fraction of the bound and of
            min(cpu, model)
  steady    images/s after the first part file came out (start-up and pipeline fill left out),
            and its fraction of the bound.

    python -m bench.score_throughput [--images 6000] [--source-size 256] [--detector padim]
        [--set backbone=mobilenet_v2 --set image_size=128] [--num-actors 1] [--use-gpu]
        [--address RAY_ADDRESS]
    python -m bench.score_throughput --smoke   # CI: a few images, does it run
"""

from __future__ import annotations

import argparse
import os
import tempfile

from anomaly_core.config import parse_overrides
from bench.ceilings import cpu_ceilings, model_ceiling
from bench.common import (
    bench_artifact,
    detector_at_defaults,
    image_set,
    machine,
    print_table,
    set_env,
    write_json,
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--source-size", type=int, default=256, help="side of the image files (px)")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument("--detector", default="padim")
    p.add_argument("--set", action="append", default=None,
                   help="detector option key=value (default: backbone=mobilenet_v2, image_size=128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-file", type=int, default=256)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--extra", default="", help="more jobs.score flags, space separated")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--ceiling-images", type=int, default=2000,
                   help="images the CPU ceilings are timed on (the first of the set): a rate "
                        "needs no more, and the GPU run's 24,000 would take minutes")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to run the job on (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke", action="store_true", help="a few small images (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "score_throughput.json"))
    args = p.parse_args(argv)
    if args.set is None:
        args.set = ["backbone=mobilenet_v2", "image_size=128"]
    if args.smoke:
        args.images, args.source_size, args.batch_size, args.rows_per_file = 24, 96, 8, 8
        args.set = ["backbone=resnet18", "image_size=64"]
    set_env()
    from jobs import score
    from jobs.common import init_ray

    device = "cuda" if args.use_gpu else "cpu"
    work = tempfile.mkdtemp(prefix="bench-score-")
    paths = image_set(os.path.join(work, "data"), args.images, args.source_size, args.format)
    detector = detector_at_defaults(args.detector, device, 64 if not args.smoke else 4,
                                    parse_overrides(args.set))
    model = os.path.join(work, "model")
    bench_artifact(detector).save(model)
    size = detector.config.image_size

    cpu = cpu_ceilings(paths[:args.ceiling_images], size, args.source_size, args.cores,
                       args.rows_per_file)
    job_argv = ["--model", model, "--input", os.path.dirname(paths[0]),
                "--output", os.path.join(work, "scores"), "--batch-size", str(args.batch_size),
                "--rows-per-file", str(args.rows_per_file), "--num-actors", str(args.num_actors),
                "--cpus-per-actor", str(args.cpus_per_actor), "--progress-every", "30",
                *(["--use-gpu"] if args.use_gpu else []), *args.extra.split()]
    # The job's own settings: its precision, and whether the model actor renders the maps
    # (--render-on-device, its default on a GPU): then the row tasks only encode.
    job_args = score.parse_args(job_argv)
    rendered = job_args.render_on_device
    cpu_rate = cpu["cpu_rendered" if rendered else "cpu"]
    model_rate = model_ceiling(detector, device, job_args.precision, args.batch_size,
                               0.0 if args.smoke else 10.0,
                               (args.source_size,) * 2 if rendered else None)
    del detector
    init_ray(args.address)
    summary = score.main(job_argv)
    job = summary["images_per_s"]
    timings = summary["timings_s"]
    # after the first part file: the pipeline's steady rate, without actor start-up and fill
    steady = ((args.images - min(args.rows_per_file, args.images - 1))
              / max(timings["score"] - timings["first_rows"], 1e-9))
    ceiling_min = min(cpu_rate, model_rate["images_per_s"])
    bound = ceiling_min if args.use_gpu else 1 / (1 / cpu_rate + 1 / model_rate["images_per_s"])
    row = {"images": args.images, "decode": cpu["decode"],
           "rows": cpu["rows_rendered" if rendered else "rows"], "cpu": cpu_rate,
           "rendered_by_model": rendered,
           "model": model_rate["images_per_s"], "bound": bound, "job": job,
           "of_bound": job / bound, "of_min": job / ceiling_min,
           "first_rows_s": timings["first_rows"], "steady": steady,
           "steady_of_bound": steady / bound}
    print(f"\n{args.images} {args.source_size} px {args.format} files, {args.detector} "
          f"{','.join(args.set)} ({model_rate['precision']}) on {device}, batch "
          f"{args.batch_size}, {args.num_actors} actor(s), {args.cores} cores; images/s")
    print_table([row], [("images", "images"), ("decode", "decode"), ("rows", "rows"),
                        ("rendered_by_model", "maps rendered by the model"),
                        ("cpu", "cpu ceiling"), ("model", "model ceiling"), ("bound", "bound"),
                        ("job", "job"), ("of_bound", "job/bound"), ("of_min", "job/min"),
                        ("first_rows_s", "first rows s"), ("steady", "steady"),
                        ("steady_of_bound", "steady/bound")])
    result = {"machine": machine(), "args": vars(args), "result": row,
              "stages": summary.get("stages"), "timings_s": summary.get("timings_s")}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
