"""Scoring runs that write every row exactly once: a frozen input list, part files staged by
the tasks and published by the driver, resume by what is published, and a _SUCCESS manifest.

Layout under the output root:
    dt=YYYY-MM-DD/model=NAME/part-<run_id>-<attempt>-<digest>.parquet   the rows (published)
    _runs/<run_id>/run.json        what the run is (written first, with the input list)
    _runs/<run_id>/inputs.arrow    the input list, frozen at the run's first start
    _runs/<run_id>/attempts/<attempt>.json   each start of the run: the files published before
    _runs/<run_id>/staging/<attempt>/part-<digest>.parquet   written by the row tasks
    _runs/<run_id>/_SUCCESS.json   counts and timings (written last)
Readers skip `_runs` (names starting with "_" are hidden by pyarrow, pandas, Spark and Hive).

Exactly once without a timing assumption: row tasks only ever write into their attempt's
staging folder; only the driver of the attempt publishes a staged file into the partition (a
rename, or a server-side copy on S3), after the task that wrote it has returned. A straggler
task of a killed attempt can therefore write only where nothing reads. A resumed attempt
schedules what is not published; when it finishes it deletes any file of another attempt that
was published after it planned (only a dead driver's last copy in flight can do that), then the
staging folders.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.ipc as ipc

from anomaly_core import storage
from anomaly_core.scoring.index import INDEX_DIR, ScoredIndex
from anomaly_core.scoring.inputs import INPUT_SCHEMA, list_inputs
from anomaly_core.scoring.schema import parquet_bytes, partition_path, score_table, utc_now

RUNS_DIR = "_runs"


@dataclass(frozen=True)
class RunAttempt:
    """One start of a run as its row tasks see it: what the run is and this attempt, without
    the input list (small and frozen: it travels to every task). run.json keeps all but
    `attempt`."""

    run_id: str
    output: str
    model: str
    model_version: str
    day: str  # YYYY-MM-DD of the partition the run writes
    source: str
    incremental: bool
    created_at: str
    # this start of the run: its tasks stage part files under this name
    attempt: str = field(default_factory=lambda: new_attempt())
    # the registered model and version (models:/product/version) the run scores with, if any
    product: str | None = None
    registered_version: int | None = None

    @property
    def partition(self) -> str:
        return partition_path(self.output, self.model, datetime.strptime(self.day, "%Y-%m-%d"))

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, RUNS_DIR, self.run_id)

    @property
    def staging(self) -> str:
        return storage.join(self.run_dir, "staging", self.attempt)


@dataclass(frozen=True)
class ScoreRun(RunAttempt):
    """One scoring run on the driver: the attempt, with the frozen input list it plans from."""

    resumed: bool = False
    inputs: pa.Table = field(default=None, repr=False)
    # the part files published when this attempt planned (filled by pending(); see finish)
    planned_files: set[str] = field(default_factory=set, repr=False)

    def describe(self) -> RunAttempt:
        """What the run is, and this attempt: what its row tasks receive."""
        return RunAttempt(**{k: getattr(self, k) for k in RunAttempt.__dataclass_fields__})


def new_attempt() -> str:
    """A start of a run: UTC time (sortable) and a random suffix, no dashes."""
    return f"{utc_now():%Y%m%dT%H%M%S}{uuid.uuid4().hex[:6]}"


def default_run_id(day: str, model_version: str, source: str, incremental: bool) -> str:
    """Same command, same model, same day -> same run, so starting it again resumes it."""
    digest = hashlib.sha256(f"{source}|{incremental}".encode()).hexdigest()[:8]
    return f"{day.replace('-', '')}-{model_version}-{digest}"


def scan_history(output: str, model: str, model_version: str) -> pa.Table:
    """(uri, etag, scored_at) of the latest error-free scoring of every image by this model
    version, read from every part file under `output`: linear in history. Used once per output
    and model, to fill the index (index.ScoredIndex) of results written before it."""
    empty = pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                      "scored_at": pa.array([], pa.timestamp("us", tz="UTC"))})
    if not storage.exists(output):
        return empty
    files = [
        f for f in storage.list_files(output, extensions=[".parquet"])
        if f"/model={model}/" in f and f"/{RUNS_DIR}/" not in f and f"/{INDEX_DIR}/" not in f
    ]
    if not files:
        return empty
    condition = (pc.field("model_version") == model_version) & pc.field("error").is_null()
    rows = read_parquet(files, ["uri", "etag", "scored_at"], condition)
    if rows.num_rows == 0:
        return empty
    # The latest scoring of each image counts: a file changed and changed back is rescored.
    rows = rows.sort_by([("uri", "ascending"), ("scored_at", "descending")])
    uris = rows["uri"].combine_chunks()
    first = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    keep = pa.concat_arrays([pa.array([True]), first])
    return rows.filter(keep)


def model_index(output: str, model: str, model_version: str) -> ScoredIndex:
    """The incremental state of a model version. An output that has no index for this model yet
    (results written before it) gets it filled once from the part files."""
    index = ScoredIndex(output, model, model_version)
    if not storage.exists(storage.join(output, INDEX_DIR, model)):
        index.add(scan_history(output, model, model_version), name="backfill")
    return index


def open_run(
    *,
    source: str,
    output: str,
    model: str,
    model_version: str,
    extensions: list[str],
    manifest: bool = False,
    inventory: str | None = None,
    since: str | None = None,
    date_prefix: str | None = None,
    incremental: bool = False,
    run_id: str | None = None,
    product: str | None = None,
    registered_version: int | None = None,
) -> ScoreRun:
    """Start a run, or resume it when its input list was already frozen. The input is a folder
    or prefix, a manifest, or an S3 Inventory report filtered to a prefix; with `since` and
    `date_prefix` only the date folders from `since` on (anomaly_core.scoring.inputs)."""
    now = utc_now()
    day = f"{now:%Y-%m-%d}"
    what = "|".join(str(x) for x in (source, ",".join(extensions), inventory, since, date_prefix)
                    if x is not None)
    run_id = run_id or default_run_id(day, model_version, what, incremental)
    run_dir = storage.join(output, RUNS_DIR, run_id)
    meta_uri, inputs_uri = storage.join(run_dir, "run.json"), storage.join(run_dir, "inputs.arrow")
    if storage.exists(meta_uri):
        meta = json.loads(storage.read_bytes(meta_uri))
        if meta["model_version"] != model_version:
            raise ValueError(
                f"run {run_id} in {output} was started with model version {meta['model_version']}, "
                f"not {model_version}; pass another --run-id"
            )
        data = storage.read_bytes(inputs_uri)
        inputs = ipc.open_file(pa.BufferReader(data)).read_all()
        meta.pop("attempt", None)
        return ScoreRun(**meta, resumed=True, inputs=inputs,
                        attempt=new_attempt())
    inputs = list_inputs(source, extensions=extensions, manifest=manifest, inventory=inventory,
                         since=since, date_prefix=date_prefix, today=now.date())
    if incremental:
        # Only what can match tonight's images is read: time and memory follow tonight's
        # inputs, not the history (anomaly_core/scoring/index.py).
        done = model_index(output, model, model_version).lookup(inputs["uri"])
        joined = inputs.drop_columns(["prev_etag"]).join(
            done.rename_columns(["uri", "prev_etag"]), keys="uri", join_type="left outer"
        )
        inputs = joined.select(INPUT_SCHEMA.names).sort_by("uri").cast(INPUT_SCHEMA)
    run = ScoreRun(run_id, output, model, model_version, day, source, incremental,
                   now.isoformat(timespec="seconds"), inputs=inputs,
                   attempt=new_attempt(), product=product,
                   registered_version=registered_version)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, inputs.schema) as writer:
        writer.write_table(inputs)
    # The input list first, run.json second: run.json's presence means the list is complete.
    storage.write_bytes(inputs_uri, sink.getvalue().to_pybytes())
    meta = {k: v for k, v in asdict(run.describe()).items() if k != "attempt"}
    storage.write_bytes(meta_uri, json.dumps(meta, indent=2).encode())
    return run


def part_files(run: ScoreRun) -> list[str]:
    """The run's published part files (every attempt's)."""
    if not storage.exists(run.partition):
        return []
    prefix = f"part-{run.run_id}-"
    files = storage.list_files(run.partition, extensions=[".parquet"])
    return [f for f in files if f.rsplit("/", 1)[-1].startswith(prefix)]


def read_parquet(
    files: list[str], columns: list[str], condition=None
) -> pa.Table:
    """Some columns of a list of Parquet files (one filesystem), optionally filtered."""
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(
        columns=columns, filter=condition
    )


def pending(run: ScoreRun) -> pa.Table:
    """Inputs still to do: not in a published part file, and not unchanged since last scored.
    Records which files were published when this attempt planned (see finish)."""
    inputs = run.inputs
    published = part_files(run)
    run.planned_files.update(published)
    record = {"attempt": run.attempt, "started_at": utc_now().isoformat(timespec="seconds"),
              "published_before": [f.rsplit("/", 1)[-1] for f in published]}
    storage.write_bytes(storage.join(run.run_dir, "attempts", f"{run.attempt}.json"),
                        json.dumps(record, indent=1).encode())
    done = read_parquet(published, ["uri"])["uri"]
    keep = pc.invert(pc.is_in(inputs["uri"], value_set=done))
    # An ETag known from the listing equal to the one already scored: skip without reading.
    unchanged = pc.fill_null(pc.equal(inputs["etag"], inputs["prev_etag"]), False)
    return inputs.filter(pc.and_(keep, pc.invert(unchanged)))


def input_blocks(todo: pa.Table, cpus: float, batch_size: int, per_cpu: int = 4,
                 max_rows: int = 1024) -> list[pa.Table]:
    """The input list as blocks for Ray Data: a few per CPU of the cluster, each at least a batch
    and at most `max_rows` images. Not one per few rows (a million inputs were 15,625 blocks of
    64), and not a few huge ones either: a decode task holds its CPU until its whole block is
    decoded, so blocks of 100,000 images starve the row tasks of a small cluster for minutes
    (measured: no first rows after 150 s with 8 blocks of 125,000 on 2 CPUs)."""
    n = todo.num_rows
    size = min(max(-(-n // (per_cpu * max(int(cpus), 1))), batch_size), max(max_rows, batch_size))
    return [todo.slice(i, size) for i in range(0, n, size)]


class Progress:
    """A run's progress: done/total, images/s, ETA, as a line every few seconds."""

    def __init__(self, total: int, every: float, log: Callable[[str], Any] = print) -> None:
        self.total, self.every, self.done, self.errors, self.log = total, every, 0, 0, log
        self.start = self.last = time.perf_counter()
        self.first: float | None = None  # seconds until the first rows came out

    def update(self, images: int, errors: int) -> None:
        """Count a part file's images and errors; log a line when one is due."""
        self.done += images
        self.errors += errors
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.start
        if now - self.last < self.every and self.done != self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        self.log(f"scored {self.done}/{self.total} images "
                 f"({100 * self.done / max(self.total, 1):.0f}%), {self.errors} errors, "
                 f"{rate:.1f} images/s, ETA {eta:.0f} s")


def publish_all(run: ScoreRun, results: Iterable[dict[str, Any]],
                progress: Progress) -> dict[str, list[str]]:
    """The driver's side of the row stage: publish each staged part file once its task has
    returned (a straggler of a killed attempt never writes where readers look), count progress;
    returns the nodes that ran the model and the rows."""
    nodes: dict[str, set] = {"model": set(), "rows": set()}
    with ThreadPoolExecutor(8) as publisher:
        published = []
        for counts in results:
            if counts["staged"]:
                published.append(publisher.submit(publish_part, run, counts["staged"]))
            progress.update(counts["images"], counts["errors"])
            nodes["model"].update(n for n in counts["model_node"].split(",") if n)
            nodes["rows"].add(counts["rows_node"])
        for future in published:
            future.result()
    return {k: sorted(v) for k, v in nodes.items()}


def summary_text(run: ScoreRun, summary: dict[str, Any]) -> str:
    """The table a score job ends with."""
    table = [("run", run.run_id), ("inputs", summary["inputs"]), ("scored", summary["scored"]),
             ("errors", summary["errors"]), ("skipped", summary["skipped"]),
             ("images/s", summary["images_per_s"]), ("rows in", run.partition)]
    if run.product:
        table.append(("model", f"models:/{run.product}/{run.registered_version}"))
    return "\n".join(f"{k:<10} {v}" for k, v in table)


def stage_part(run: ScoreRun | RunAttempt, rows: list[dict[str, Any]]) -> str | None:
    """A row task's part file, written atomically into its attempt's staging folder; its name is
    a digest of its URIs (same rows, same name). Returns its URI (None for no rows)."""
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r["uri"])
    digest = hashlib.sha256("\n".join(r["uri"] for r in rows).encode()).hexdigest()[:20]
    uri = storage.join(run.staging, f"part-{digest}.parquet")
    storage.write_bytes(uri, parquet_bytes(score_table(rows)))
    return uri


def publish_part(run: ScoreRun, staged: str) -> str:
    """The driver's step: a staged part file of this attempt into the partition (readers see it
    whole or not at all). Returns its published URI."""
    name = staged.rsplit("/", 1)[-1]
    if not staged.startswith(run.staging + "/") or not name.startswith("part-"):
        raise ValueError(f"{staged} is not a part file staged by attempt {run.attempt} of run "
                         f"{run.run_id}")
    uri = storage.join(run.partition, f"part-{run.run_id}-{run.attempt}-{name[len('part-'):]}")
    storage.move(staged, uri)
    return uri


def _attempt_of(run: ScoreRun, uri: str) -> str:
    return uri.rsplit("/", 1)[-1][len(f"part-{run.run_id}-"):].split("-", 1)[0]


def finish(run: ScoreRun, timings: dict[str, float | None], extra: dict[str, Any] | None = None) -> dict:
    """Drop what a dead attempt published after this one planned, clear the staging folders,
    count what the run's part files hold and write _SUCCESS.json; returns the summary."""
    files = part_files(run)
    late = [f for f in files
            if f not in run.planned_files and _attempt_of(run, f) != run.attempt]
    for f in late:  # its rows were scheduled again by this attempt: they would repeat
        storage.delete(f)
    files = [f for f in files if f not in late]
    storage.delete(storage.join(run.run_dir, "staging"))
    # The run's error-free rows into the incremental state (again after a resume: the batch is
    # replaced, not repeated); read from tonight's files only.
    scored = read_parquet(files, ["uri", "etag", "scored_at", "error"],
                          pc.field("error").is_null())
    model_index(run.output, run.model, run.model_version).add(
        scored.select(["uri", "etag", "scored_at"]), name=run.run_id)
    errors = read_parquet(files, ["error"])["error"]
    n_rows = len(errors)
    n_errors = n_rows - errors.null_count
    summary = {
        **asdict(run.describe()),
        "inputs": run.inputs.num_rows,
        "rows": n_rows,
        "scored": n_rows - n_errors,
        "errors": n_errors,
        "skipped": run.inputs.num_rows - n_rows,
        "files": len(files),
        "partition": run.partition,
        "resumed": run.resumed,
        "late_files_removed": len(late),
        "finished_at": utc_now().isoformat(timespec="seconds"),
        "timings_s": {k: None if v is None else round(v, 3) for k, v in timings.items()},
        **(extra or {}),
    }
    body = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    storage.write_bytes(storage.join(run.run_dir, "_SUCCESS.json"), body)
    return summary
