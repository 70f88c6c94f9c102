"""Core-ms per image of the scoring job's CPU stages at its defaults, without Ray.

For each case (512 px PNG, 512 px JPEG, 2,048 px JPEG; each scored at 256 px) the job's own stage
functions run in a pool of one process per core, one thread each:
  decode    read + decode + resize to the model input (the decode tasks' `read_images`)
  rows      the row tasks' `make_rows` + Parquet bytes, with the maps rendered there at the
            image's size (a CPU node's default) or by the model actor (`--render-on-device`,
            a GPU node's default: the rows stage only encodes)
Core-ms = cores x 1000 / images per second; "both" adds decode and rows. A share of the
images (`--anomalous`, 5 % by default) scores above the threshold, so that under the job's
default `--heatmaps anomalous` that share gets a heatmap PNG.

    python -m bench.cpu_per_image [--cases png512,jpeg512,jpeg2048] [--images 400]
    python -m bench.cpu_per_image --smoke

"Before" figures: run this same file in an older checkout, whose stage functions take no
`heatmaps` (every row a heatmap then) and ship 0/255 masks:
`cd <old checkout> && PYTHONPATH=$PWD python <this checkout>/bench/cpu_per_image.py`.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if __package__ in (None, ""):  # run as a file against another checkout (PYTHONPATH first)
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ceilings import MODEL, RUN, _pool_rate, raw_maps  # noqa: E402
from bench.common import CALIBRATION, image_set, machine, print_table, write_json  # noqa: E402

CASES = {"png512": ("png", 512), "jpeg512": ("jpg", 512), "jpeg2048": ("jpg", 2048)}

# This worker's pre-rendered (mask, heatmap) bytes for the rows of maps rendered by the model.
_RENDERED: list = []
_RENDERED_KEY = ["mask_bits"]


def _init_worker(model_size: int, side: int) -> None:
    import torch

    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.scorer import render_maps

    torch.set_num_threads(1)
    # As the model actor ships them: the mask's bits packed (an older checkout: 0/255 bytes).
    packed = {"packed": True} if "packed" in inspect.signature(render_maps).parameters else {}
    masks, heats = render_maps(torch.from_numpy(raw_maps(4, model_size)), [(side, side)] * 4,
                               Calibration(**CALIBRATION), **packed)
    _RENDERED[:] = [(m.tobytes(), h.tobytes()) for m, h in zip(masks, heats)]
    _RENDERED_KEY[0] = "mask_bits" if packed else "mask_u8"


def _decode(paths: list[str], size: int) -> int:
    from anomaly_core.scoring.rows import read_images

    n = len(paths)
    batch = {"uri": paths, "etag": [""] * n, "prev_etag": [""] * n, "product": ["bench"] * n}
    out = read_images(batch, {"bench": (size, size)}, 10**9)
    assert not any(out["error"]), out["error"]
    return n


def _rows(n: int, model_size: int, side: int, rendered: bool, anomalous: float) -> int:
    import numpy as np

    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.rows import make_rows
    from anomaly_core.scoring.runs import RunAttempt, RunModel
    from anomaly_core.scoring.schema import parquet_bytes, score_table

    # Scores above the threshold (1.0) for the first `anomalous` share of the rows.
    scores = np.where(np.arange(n) < round(anomalous * n), 1.5, 0.5).astype(np.float32)
    batch = {"uri": [f"/bench/{i}.png" for i in range(n)], "etag": ["e"] * n, "error": [""] * n,
             "size_bytes": [1] * n, "width": [side] * n, "height": [side] * n,
             "skipped": np.zeros(n, bool), "raw_score": scores, "product": ["bench"] * n}
    if rendered:
        pairs = [_RENDERED[i % len(_RENDERED)] for i in range(n)]
        batch.update({_RENDERED_KEY[0]: [m for m, _ in pairs], "heat_u8": [h for _, h in pairs]})
    else:
        batch["raw_map"] = raw_maps(n, model_size)
    run = RunAttempt(**RUN, models=(RunModel(**MODEL),), attempt="bench")
    calibrations = {"bench": Calibration(**CALIBRATION)}
    if "heatmaps" in inspect.signature(make_rows).parameters:
        rows = make_rows(batch, run, calibrations, None, "anomalous")
    else:  # an older checkout: a heatmap on every row
        rows = make_rows(batch, run, calibrations, None)
    return len(rows) if parquet_bytes(score_table(rows)) else 0


def measure(paths: list[str], side: int, model_size: int, cores: int, anomalous: float,
            rows_per_task: int = 64) -> dict:
    """Core-ms per image of decode, rows (rendered there and by the model) and their sums."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["anomaly_core.scoring.rows", "anomaly_core.scoring.scorer",
                                    "anomaly_core.scoring.schema"])
    chunk = max(1, min(32, len(paths) // (4 * cores)))
    with ProcessPoolExecutor(cores, mp_context=context, initializer=_init_worker,
                             initargs=(model_size, side)) as pool:
        list(pool.map(_decode, [paths[:1]] * cores, [model_size] * cores))  # imports, warm-up
        list(pool.map(_rows, [1] * cores, [model_size] * cores, [side] * cores,
                      [False] * cores, [anomalous] * cores))
        decode = _pool_rate(pool, _decode, [(paths[i:i + chunk], model_size)
                                       for i in range(0, len(paths), chunk)])
        per = min(rows_per_task, max(1, len(paths) // cores))
        jobs = [(min(per, len(paths) - i), model_size, side)
                for i in range(0, len(paths), per)]
        rows = _pool_rate(pool, _rows, [(*job, False, anomalous) for job in jobs])
        rendered = _pool_rate(pool, _rows, [(*job, True, anomalous) for job in jobs])
    ms = {k: cores * 1000.0 / v for k, v in
          (("decode", decode), ("rows", rows), ("rows_rendered", rendered))}
    return {**ms, "both": ms["decode"] + ms["rows"],
            "both_rendered": ms["decode"] + ms["rows_rendered"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--images", type=int, default=400, help="images per case")
    p.add_argument("--input-size", type=int, default=256, help="model input (px)")
    p.add_argument("--anomalous", type=float, default=0.05,
                   help="share of images above the threshold (they get a heatmap)")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it run (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cpu_per_image.json"))
    args = p.parse_args(argv)
    cases = {name: CASES[name] for name in args.cases.split(",")}
    if args.smoke:
        args.images, args.input_size = 8, 32
        cases = {"png64": ("png", 64), "jpeg128": ("jpg", 128)}
    decoders = os.environ.get("ANOMALY_DECODER") or "fastest per file"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as work:
        for name, (fmt, side) in cases.items():
            paths = image_set(os.path.join(work, name), args.images, side, fmt,
                              distinct=8 if side > 1024 else 40)
            row = measure(paths, side, args.input_size, args.cores, args.anomalous)
            results.append({"case": f"{side} px {fmt.upper()}", **row})
    print(f"\nCore-ms per image, {args.cores} processes, scored at {args.input_size} px, masks at "
          f"the image's size, {args.anomalous:.0%} anomalous, decoders: {decoders}")
    print_table([{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
                 for r in results],
                [("case", "case"), ("decode", "decode"), ("rows", "rows, rendered there"),
                 ("both", "both (CPU node)"), ("rows_rendered", "rows, rendered by the model"),
                 ("both_rendered", "both (GPU node)")])
    result = {"machine": machine(), "args": vars(args), "decoders": decoders, "cases": results}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
