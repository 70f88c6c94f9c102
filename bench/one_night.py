"""One incremental night of --tonight new images over --history rows already scored, against the
same night with no history: planning time and memory from the scored index. Prints a table and
writes JSON.

History: --history rows in the index (anomaly_core/scoring/index.py) of one model version, as
--per-day images a day over 20 camera lines (s3://plant/line{l:02d}/{date}/img{i:08d}.png), added
a day-batch at a time as finished runs add them (merges included; the time is printed, not the
point). Tonight: --tonight images of a new day plus 10 % of them re-listed from the last day (a
tenth of those with a new etag). Planning = the lookup plus the join that says what to score,
measured as bench.nightly_year measures it: in a fresh process forked from one that only
imported the modules, after a warm-up on a tiny index, peak RSS growth with the system allocator.
The full scan (runs.scan_history) is not run here: at this size it needs the whole history in
memory (bench.nightly_year compares the two as history grows).

    python -m bench.one_night [--history 100000000] [--tonight 1000000] [--per-day 1000000]
    python -m bench.one_night --smoke      # 200,000 rows of history, 20,000 tonight (CI)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import machine, print_table, write_json
from bench.nightly_year import MODEL, START, VERSION, plan_in_fresh_process


def day_uris(day: int, n: int, offset: int = 0) -> pa.Array:
    """n image URIs of day `day` (0 = START), spread over 20 lines."""
    date = (START + timedelta(days=day)).strftime("%Y-%m-%d")
    i = np.arange(offset, offset + n)
    line = pc.utf8_lpad(pa.array(i % 20).cast(pa.string()), width=2, padding="0")
    num = pc.utf8_lpad(pa.array(i).cast(pa.string()), width=8, padding="0")
    return pc.binary_join_element_wise("s3://plant/line", line, f"/{date}/img", num, ".png", "")


def etags(n: int, seed: int) -> pa.Array:
    return pa.array(np.random.default_rng(seed).integers(0, 2**62, n)).cast(pa.string())


def build_history(output: str, rows: int, per_day: int) -> tuple[int, float]:
    """The index of `rows` scored images, a day at a time; returns (days, seconds)."""
    from anomaly_core.scoring.index import ScoredIndex

    index = ScoredIndex(output, MODEL, VERSION)
    days, start = -(-rows // per_day), time.perf_counter()
    for day in range(days):
        n = min(per_day, rows - day * per_day)
        at = pa.array([START + timedelta(days=day)] * n, pa.timestamp("us", tz="UTC"))
        index.add(pa.table({"uri": day_uris(day, n), "etag": etags(n, day), "scored_at": at}),
                  name=f"day{day:05d}")
    return days, time.perf_counter() - start


def tonight_file(folder: str, day: int, n: int, per_day: int) -> str:
    """Tonight's listing as an Arrow file: n new images and 10 % re-listed from `day - 1`."""
    relist = max(1, n // 10) if day else 0
    old = day_uris(day - 1, relist, offset=per_day - relist) if relist else pa.array([], pa.string())
    old_etags = etags(relist, day - 1) if relist else pa.array([], pa.string())
    if relist:  # these are the last `relist` of that day: same etags as it was scored with
        old_etags = etags(per_day, day - 1).slice(per_day - relist)
        changed = np.zeros(relist, bool)
        changed[: relist // 10] = True
        old_etags = pc.if_else(pa.array(changed), pa.array(["changed"] * relist), old_etags)
    table = pa.table({"uri": pa.concat_arrays([day_uris(day, n), old]),
                      "etag": pa.concat_arrays([etags(n, 10**6 + day), old_etags])})
    path = os.path.join(folder, f"tonight-{day}.arrow")
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--history", type=int, default=100_000_000)
    p.add_argument("--tonight", type=int, default=1_000_000)
    p.add_argument("--per-day", type=int, default=1_000_000)
    p.add_argument("--smoke", action="store_true", help="small sizes (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "one_night.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.history, args.tonight, args.per_day = 200_000, 20_000, 50_000
    work = tempfile.mkdtemp(prefix="bench-one-night-")
    empty, full = os.path.join(work, "empty"), os.path.join(work, "full")
    days, build_s = build_history(full, args.history, args.per_day)
    print(f"history: {args.history:,} rows over {days} days added in {build_s:.0f} s")
    rows = []
    for name, output in (("no history", empty), (f"{args.history:,} rows", full)):
        # the same listing for both nights: day `days` (the one after the history)
        plan = plan_in_fresh_process("new", output, tonight_file(work, days, args.tonight, args.per_day))
        rows.append({"history": name, "tonight": args.tonight + (args.tonight // 10),
                     "plan_s": plan["seconds"], "peak_mb": plan["peak_mb"],
                     "todo": plan["todo"], "row_groups_read": plan.get("lookup_row_groups_read"),
                     "rows_read": plan.get("lookup_rows_read")})
    rows[1]["x_no_history_s"] = rows[1]["plan_s"] / rows[0]["plan_s"]
    rows[1]["x_no_history_mb"] = rows[1]["peak_mb"] / max(rows[0]["peak_mb"], 1e-9)
    expected = args.tonight + args.tonight // 10 // 10  # new ones, and the re-listed changed
    assert rows[1]["todo"] == expected, (rows[1]["todo"], expected)  # the plan is right
    print_table(rows, [("history", "history"), ("tonight", "tonight's images"),
                       ("plan_s", "plan s"), ("peak_mb", "peak MB"), ("todo", "to score"),
                       ("row_groups_read", "row groups read"), ("rows_read", "rows read"),
                       ("x_no_history_s", "time x no history"),
                       ("x_no_history_mb", "memory x no history")])
    result = {"machine": machine(), "args": vars(args), "build_s": build_s, "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
