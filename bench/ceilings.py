"""The node's two ceilings for one image set, in images/s, without Ray.

CPU, the job's CPU stages on all cores (one process per core, one thread each):
  decode  read + decode + resize to the model's input (the decode tasks' `read_images`)
  rows    maps rendered at the image's size, mask and heatmap PNGs, Parquet bytes (`make_rows`)
  cpu     both stages on the same cores: 1 / (1/decode + 1/rows)
  rows_rendered, cpu_rendered   the same with the maps rendered by the model actor
          (jobs.score --render-on-device, the default on GPUs): PNGs and Parquet only
Model, per detector at its defaults (random weights: speed does not depend on their values):
  uint8 batches already on the device through the Scorer (floats made there), fp32, and the
  16-bit precisions on a GPU.

    python -m bench.ceilings [--images 600] [--source-size 512] [--detectors all] [--out F]
    python -m bench.ceilings --smoke      # a few small images and two small detectors (CI)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from anomaly_core.config import parse_overrides
from bench.common import (
    CALIBRATION,
    DETECTORS,
    bench_artifact,
    cuda_available,
    detector_at_defaults,
    image_set,
    machine,
    print_table,
    synchronizer,
    write_json,
)

RUN = {"run_id": "bench", "output": "/tmp/bench", "day": "2026-01-01", "source": "bench",
       "incremental": False, "created_at": "bench"}
MODEL = {"product": "bench", "version": "v", "model_version": "v", "detector": "padim",
         "uri": "/tmp/bench/model"}


# This worker's pre-rendered (mask, heatmap) pairs for the rows_rendered stage, made before the
# timing: in the job the model actor renders them (--render-on-device).
_RENDERED: list = []


def _init_worker(model_size: int, height: int, width: int) -> None:
    import torch

    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.scorer import render_maps

    torch.set_num_threads(1)
    masks, heats = render_maps(torch.from_numpy(raw_maps(8, model_size)), [(height, width)] * 8,
                               Calibration(**CALIBRATION), packed=True)
    _RENDERED[:] = [(m.tobytes(), h.tobytes()) for m, h in zip(masks, heats)]


def _decode(paths: list[str], size: int) -> int:
    from anomaly_core.scoring.rows import read_images

    batch = {"uri": paths, "etag": [""] * len(paths), "prev_etag": [""] * len(paths),
             "product": ["bench"] * len(paths)}
    out = read_images(batch, {"bench": (size, size)}, 10**9, None)
    assert not any(out["error"]), out["error"]
    return len(paths)


def raw_maps(n: int, size: int, seed: int = 0):
    """Smooth maps [n,size,size] like a detector's: low-frequency noise, about 1 % above the
    pixel threshold of CALIBRATION."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 8, 8, generator=g)
    maps = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    top = maps.flatten(1).quantile(0.99, dim=1).view(-1, 1, 1)
    return (maps / top).numpy().astype("float32")


def _rows(n: int, model_size: int, height: int, width: int, rendered: bool = False) -> int:
    import numpy as np

    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.rows import make_rows
    from anomaly_core.scoring.runs import RunAttempt, RunModel
    from anomaly_core.scoring.schema import parquet_bytes, score_table

    batch = {"uri": [f"/bench/{i}.png" for i in range(n)], "etag": ["e"] * n, "error": [""] * n,
             "size_bytes": [1] * n, "width": [width] * n, "height": [height] * n,
             "skipped": np.zeros(n, bool), "raw_score": np.ones(n, np.float32),
             "product": ["bench"] * n}
    if rendered:
        pairs = [_RENDERED[i % len(_RENDERED)] for i in range(n)]
        batch.update(mask_bits=[m for m, _ in pairs], heat_u8=[h for _, h in pairs])
    else:
        batch["raw_map"] = raw_maps(n, model_size)
    run = RunAttempt(**RUN, models=(RunModel(**MODEL),), attempt="bench")
    rows = make_rows(batch, run, {"bench": Calibration(**CALIBRATION)}, None)
    return len(rows) if parquet_bytes(score_table(rows)) else 0


def _pool_rate(pool: ProcessPoolExecutor, fn, jobs: list[tuple]) -> float:
    start = time.perf_counter()
    done = sum(pool.map(fn, *zip(*jobs)))
    return done / (time.perf_counter() - start)


def cpu_ceilings(paths: list[str], model_size: int, source_size: int, cores: int,
                 rows_per_file: int = 256) -> dict:
    """decode, rows and both together (images/s) on `cores` processes; rows_rendered and
    cpu_rendered with the maps rendered before the row stage (by the model actor)."""
    chunk = max(1, min(32, len(paths) // (4 * cores)))
    # Not fork: the caller may hold threads (Ray, torch) that a forked child would inherit. A
    # forkserver imports the stages once; each worker is a cheap fork of it.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["anomaly_core.scoring.rows", "anomaly_core.scoring.scorer",
                                    "anomaly_core.scoring.schema"])
    with ProcessPoolExecutor(cores, mp_context=context, initializer=_init_worker,
                             initargs=(model_size, source_size, source_size)) as pool:
        warm = [(paths[:1], model_size)] * cores  # imports and first-call costs out of the timing
        list(pool.map(_decode, *zip(*warm)))
        list(pool.map(_rows, [1] * cores, [model_size] * cores, [source_size] * cores,
                      [source_size] * cores))
        decode = _pool_rate(pool, _decode, [(paths[i:i + chunk], model_size)
                                            for i in range(0, len(paths), chunk)])
        per = min(rows_per_file, max(1, len(paths) // cores))
        jobs = [(min(per, len(paths) - i), model_size, source_size, source_size)
                for i in range(0, len(paths), per)]
        rows = _pool_rate(pool, _rows, jobs)
        rendered = _pool_rate(pool, _rows, [(*job, True) for job in jobs])
    return {"decode": decode, "rows": rows, "cpu": 1 / (1 / decode + 1 / rows),
            "rows_rendered": rendered, "cpu_rendered": 1 / (1 / decode + 1 / rendered)}


def model_ceiling(detector, device: str, precision: str, batch_size: int,
                  seconds: float = 10.0, render_size: tuple[int, int] | None = None) -> dict:
    """images/s of a detector on uint8 batches already on the device; peak GPU memory. With
    `render_size` each batch's maps are also rendered there at that size and copied to the host
    (the model actor's work under jobs.score --render-on-device)."""
    import torch

    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.scorer import Scorer, render_maps

    size = detector.config.image_size
    scorer = Scorer(bench_artifact(detector), device=device, precision=precision)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g)
    images = images.to(device)
    sync = synchronizer(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    calibration = Calibration(**CALIBRATION)

    def call() -> None:
        out = scorer(images)
        if render_size is not None:
            render_maps(out.map, [render_size] * batch_size, calibration)

    call()  # warm-up: kernels chosen, caches filled
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - start < seconds and calls < 200):
        call()
        calls += 1
        sync()
    rate = calls * batch_size / (time.perf_counter() - start)
    row = {"detector": detector.name, "precision": scorer.precision, "image_size": size,
           "images_per_s": rate}
    if device.startswith("cuda"):
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=600, help="image files for the CPU stages")
    p.add_argument("--source-size", type=int, default=512, help="side of the image files (px)")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument("--input-size", type=int, default=256, help="model input the decode resizes to")
    p.add_argument("--detectors", default=",".join(DETECTORS))
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--precisions", help="comma list (default: fp32, plus fp16,bf16 on a GPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fit-images", type=int, default=64, help="images memory detectors fit on")
    p.add_argument("--seconds", type=float, default=10.0, help="timing per detector/precision")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--set", action="append", default=[], help="detector option key=value")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it run (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "ceilings.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.source_size, args.input_size, args.batch_size = 16, 96, 64, 4
        args.detectors, args.seconds, args.fit_images = "padim,stpm", 0.0, 4
        args.set = ["image_size=64", "backbone=resnet18", *args.set]
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32", "fp16", "bf16"] if args.device.startswith("cuda") else ["fp32"])
    sets = parse_overrides(args.set)

    work = tempfile.mkdtemp(prefix="bench-ceilings-")
    paths = image_set(work, args.images, args.source_size, args.format)
    cpu = cpu_ceilings(paths, args.input_size, args.source_size, args.cores)
    print(f"\nCPU ceilings: {args.images} {args.source_size} px {args.format} files -> "
          f"{args.input_size} px, {args.cores} processes")
    print_table([{k: round(v, 1) for k, v in cpu.items()}],
                [("decode", "decode images/s"), ("rows", "rows images/s"), ("cpu", "both images/s"),
                 ("rows_rendered", "rows, maps rendered by the model"),
                 ("cpu_rendered", "both, maps rendered by the model")])
    models = []
    for name in args.detectors.split(","):
        detector = None
        for precision in precisions:
            try:
                detector = detector or detector_at_defaults(name, args.device, args.fit_images, sets)
                models.append(model_ceiling(detector, args.device, precision, args.batch_size,
                                            args.seconds))
            except Exception as exc:  # one detector failing keeps the others' numbers
                models.append({"detector": name, "precision": precision,
                               "error": f"{type(exc).__name__}: {exc}"[:300]})
        del detector
    print(f"\nModel ceilings on {args.device}, batch {args.batch_size}, defaults"
          f"{' + ' + ','.join(args.set) if args.set else ''}")
    print_table(models, [("detector", "detector"), ("precision", "precision"),
                         ("image_size", "px"), ("images_per_s", "images/s"),
                         ("peak_gpu_mb", "peak GPU MB"), ("error", "error")])
    result = {"machine": machine(), "args": vars(args), "cpu": cpu, "models": models}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
