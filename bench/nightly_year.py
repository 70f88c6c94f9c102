"""A year of nightly incremental runs: planning with the scored index
(anomaly_core/scoring/index.py) against the full scan of the results (runs.scan_history), as
history grows. Prints a table and writes JSON.

Each night lists `--per-night` new images (s3://plant/line{l:02d}/{date}/img{i:07d}.png over 20
lines) plus `--relist` x per-night images of the last `--relist-days` nights listed again (a
prefix that keeps a few days; `--relist-changed` of them with a new etag), then:
  plan     tonight's lookup, and the join that says what to score (an image is skipped when its
           latest error-free scoring has tonight's etag). New: ScoredIndex.lookup every night.
           Old: runs.scan_history (lists and reads every row ever written) every `--old-every`
           nights (it grows linearly) and on the last night. Both answers are checked against
           the bench's own bookkeeping (a wrong plan stops the bench).
  record   the images planned are "scored": (a) their rows go to one Parquet part file under the
           results layout the old scan reads, partition_path(output, day, product, version)/part-*.parquet,
           with only the columns it reads (uri, etag, scored_at, model_version, error; a few rows
           have an error), and (b) the error-free rows go to ScoredIndex.add (timed: "add s",
           compactions included).

Peak memory: each measured planning runs in a fresh process, forked from a server process that
only imported the modules (multiprocessing "forkserver"); it first plans once on a tiny output
(the first use of a code path faults in library pages and starts thread pools), then reads
tonight's list from an Arrow file. No earlier night's allocations or allocator caches count.
"peak MB" is how far planning raised that process's peak RSS (ru_maxrss) above its peak just
before planning. Those processes use the system allocator (ARROW_DEFAULT_MEMORY_POOL=system):
pyarrow's default, mimalloc, keeps per-thread segments it does not give back, which adds 5-50 MB
of RSS that depends on thread scheduling, not on the data (measured). The JSON also has the
absolute peak RSS and the growth of pyarrow's pool maximum (Arrow buffers only). Plan
seconds are measured inside that process (no start-up). The results and the index are local
files (a tmp folder): on S3 both would add request latency, the old scan one GET per part file,
the index a few per index file.

    python -m bench.nightly_year [--nights 365] [--per-night 100000] [--old-every 30]
        [--relist 0.1] [--relist-days 7] [--relist-changed 0.1] [--work DIR] [--out FILE]
    python -m bench.nightly_year --smoke   # CI: 6 nights x 2000 images, the old scan every 2nd
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import print_table, write_json

MODEL, VERSION, LINES = "padim", "v1", 20
START = datetime(2025, 1, 1, 1, 0, tzinfo=UTC)
TONIGHT = pa.schema([("uri", pa.string()), ("etag", pa.string())])


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plan_in_this_process(kind: str, output: str, tonight_file: str) -> dict:
    """One planning, measured (the child's side): what to score tonight, new or old way."""
    from anomaly_core.scoring import runs
    from anomaly_core.scoring.index import ScoredIndex

    def plan(output: str, tonight: pa.Table) -> tuple[pa.Table, pa.Table, dict]:
        stats = {}
        if kind == "new":
            index = ScoredIndex(output, MODEL, VERSION)
            done = index.lookup(tonight["uri"])
            stats = index.last_lookup
        else:
            done = runs.scan_history(output, MODEL, VERSION).select(["uri", "etag"])
        joined = tonight.join(done.rename_columns(["uri", "prev_etag"]), keys="uri",
                              join_type="left outer")
        same = pc.fill_null(pc.equal(joined["etag"], joined["prev_etag"]), False)
        return done, joined.filter(pc.invert(same)).select(["uri", "etag"]).sort_by("uri"), stats

    # Warm up on a tiny output first: the first use of a code path faults in pages of the
    # libraries and starts thread pools, which would otherwise count as planning memory.
    with tempfile.TemporaryDirectory() as tiny:
        rows = _scored(pa.table([["s3://a/1.png", "s3://a/2.png"], ["e", "e"]], schema=TONIGHT),
                       START, [False, True])
        tiny = os.path.join(tiny, "scores")
        _record(tiny, ScoredIndex(tiny, MODEL, VERSION), START, rows, "warm-up")
        plan(tiny, rows.select(["uri", "etag"]))
    with pa.OSFile(tonight_file) as f:
        tonight = pa.ipc.open_file(f).read_all()
    before = _peak_mb()
    pool = pa.default_memory_pool()
    arrow_before = pool.bytes_allocated()
    start = time.perf_counter()
    done, todo, stats = plan(output, tonight)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": _peak_mb() - before, "peak_rss_mb": _peak_mb(),
            "arrow_pool": pool.backend_name,
            "arrow_peak_mb": (pool.max_memory() - arrow_before) / 2**20, "known": done.num_rows,
            "todo": todo.num_rows, **{f"lookup_{k}": v for k, v in stats.items()}}


def _scored(todo: pa.Table, day: datetime, failed) -> pa.Table:
    """The rows of scoring `todo` on `day`, with only the columns the full scan reads."""
    k = todo.num_rows
    scored_at = pa.array([day + timedelta(microseconds=i) for i in range(k)],
                         pa.timestamp("us", tz="UTC"))
    return todo.append_column("scored_at", scored_at).append_column(
        "model_version", pa.array([VERSION] * k)).append_column(
        "error", pa.array(["decode failed" if f else None for f in failed], pa.string()))


def _options(args) -> dict:
    return {} if args.row_group_rows is None else {"row_group_rows": args.row_group_rows}


def _record(output: str, index, day: datetime, scored: pa.Table, name: str) -> float:
    """The night's rows as a part file of the results, and into the index; the add's seconds."""
    from anomaly_core import storage
    from anomaly_core.scoring.schema import parquet_bytes, partition_path

    part = storage.join(partition_path(output, f"{day:%Y-%m-%d}", MODEL, VERSION),
                        f"part-{name}.parquet")
    storage.write_bytes(part, parquet_bytes(scored))
    start = time.perf_counter()
    index.add(scored, name)
    return time.perf_counter() - start


def plan_in_fresh_process(kind: str, output: str, tonight_file: str) -> dict:
    """A planning in a fresh process (see the module docstring), forked from a server process
    that only imported the modules (no import time, nothing of this process's)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["anomaly_core.scoring.runs", "anomaly_core.scoring.index", "pyarrow.compute"])
    saved = os.environ.get("ARROW_DEFAULT_MEMORY_POOL")
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"  # read when the server imports pyarrow
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            os.environ.pop("ARROW_DEFAULT_MEMORY_POOL")
        else:
            os.environ["ARROW_DEFAULT_MEMORY_POOL"] = saved
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(plan_in_this_process, kind, output, tonight_file).result()


def _etags(rng: np.random.Generator, n: int) -> list[str]:
    text = rng.bytes(16 * n).hex()
    return [text[i * 32:(i + 1) * 32] for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nights", type=int, default=365)
    p.add_argument("--per-night", type=int, default=100_000, help="new images a night")
    p.add_argument("--old-every", type=int, default=30, help="run the old full scan every k nights")
    p.add_argument("--relist", type=float, default=0.1,
                   help="images of recent nights listed again, as a fraction of --per-night")
    p.add_argument("--relist-days", type=int, default=7, help="how far back re-listed images go")
    p.add_argument("--relist-changed", type=float, default=0.1,
                   help="fraction of re-listed images with a new etag")
    p.add_argument("--error-rate", type=float, default=0.002, help="rows scored with an error")
    p.add_argument("--row-group-rows", type=int, default=None,
                   help="the index's row group size (default: the index's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for the results and index (default: tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--smoke", action="store_true", help="6 nights x 2000 images (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "nightly_year.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.nights, args.per_night, args.old_every = 6, 2000, 2

    from anomaly_core.scoring.index import ScoredIndex

    work = args.work or tempfile.mkdtemp(prefix="bench-nightly-")
    os.makedirs(work, exist_ok=True)
    output = os.path.join(work, "scores")
    tonight_file = os.path.join(work, "tonight.arrow")
    index = ScoredIndex(output, MODEL, VERSION, **_options(args))
    rng = np.random.default_rng(args.seed)
    ok_etag: dict[str, str] = {}  # latest error-free etag of the images that may be re-listed
    window: deque[list[str]] = deque(maxlen=args.relist_days)  # their uris, by night
    rows, history, wall = [], 0, time.perf_counter()
    try:
        for night in range(args.nights):
            day = START + timedelta(days=night)
            date = f"{day:%Y-%m-%d}"
            n = args.per_night
            uris = [f"s3://plant/line{i % LINES:02d}/{date}/img{i:07d}.png" for i in range(n)]
            etags = _etags(rng, n)
            recent = [u for uris_of_night in window for u in uris_of_night]
            relisted = [recent[i] for i in rng.choice(len(recent), min(len(recent),
                        int(args.relist * n)), replace=False)] if recent else []
            changed = rng.random(len(relisted)) < args.relist_changed
            new_etags = iter(_etags(rng, int(changed.sum())))
            # an image whose last scoring failed has no ok_etag: its old etag is made up
            relisted_etags = [next(new_etags) if c else ok_etag.get(u, "failed")
                              for u, c in zip(relisted, changed)]
            tonight = pa.table([uris + relisted, etags + relisted_etags], schema=TONIGHT)
            # what a correct plan scores: no error-free scoring with tonight's etag
            to_score = pa.array([ok_etag.get(u) != e for u, e in zip(uris + relisted,
                                                                      etags + relisted_etags)])
            expected = pc.sum(to_score).as_py() or 0
            with pa.OSFile(tonight_file, "wb") as f, pa.ipc.new_file(f, TONIGHT) as writer:
                writer.write_table(tonight)

            row = {"night": night + 1, "history_rows": history, "tonight": tonight.num_rows,
                   "index_files": len(index.files()) if index.exists() else 0}
            new = plan_in_fresh_process("new", output, tonight_file)
            if new["todo"] != expected:
                raise AssertionError(f"night {night + 1}: the index plans {new['todo']} images, "
                                     f"{expected} expected")
            row.update(new_s=new["seconds"], new_mb=new["peak_mb"], todo=new["todo"],
                       rg_read=new.get("lookup_row_groups_read"), rg=new.get("lookup_row_groups"),
                       rows_read=new.get("lookup_rows_read"), new_detail=new)
            if (night + 1) % args.old_every == 0 or night == args.nights - 1:
                old = plan_in_fresh_process("old", output, tonight_file)
                if old["todo"] != expected:
                    raise AssertionError(f"night {night + 1}: the full scan plans {old['todo']} "
                                         f"images, {expected} expected")
                row.update(old_s=old["seconds"], old_mb=old["peak_mb"], old_detail=old)

            # "score" what was planned and record it both ways
            todo = tonight.filter(to_score)
            failed = rng.random(todo.num_rows) < args.error_rate
            row["add_s"] = _record(output, index, day, _scored(todo, day, failed), f"night-{date}")
            for u, e, f in zip(todo["uri"].to_pylist(), todo["etag"].to_pylist(), failed):
                if not f:
                    ok_etag[u] = e
            if len(window) == window.maxlen:
                for u in window[0]:
                    ok_etag.pop(u, None)
            window.append(uris)
            history += todo.num_rows
            row["index_mb"] = sum(os.path.getsize(os.path.join(index.root, e["file"]))
                                  for e in index.files()) / 2**20
            rows.append(row)
            if not args.smoke:
                print(f"night {night + 1}: history {history}, new {row['new_s']:.3f} s, "
                      f"add {row['add_s']:.3f} s", file=sys.stderr)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - wall

    print(f"\n{args.nights} nights x {args.per_night} new images (+{args.relist:g} re-listed "
          f"from the last {args.relist_days} nights, {args.relist_changed:g} of them changed); "
          f"nights with the old scan, and the last")
    shown = [r for r in rows if "old_s" in r or r is rows[0]]
    print_table(shown, [("night", "night"), ("history_rows", "history rows"),
                        ("index_files", "index files"), ("rg_read", "rg read"), ("rg", "rg"),
                        ("rows_read", "rows read"),
                        ("new_s", "new plan s"), ("new_mb", "new peak MB"),
                        ("old_s", "old plan s"), ("old_mb", "old peak MB"),
                        ("add_s", "add s"), ("index_mb", "index MB")])
    print(f"wall {wall:.1f} s")
    result = {"machine": {"date": datetime.now(UTC).strftime("%Y-%m-%d"),
                          "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                          "pyarrow": pa.__version__},
              "args": vars(args), "wall_s": wall, "nights": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
