"""Scoring runs that write every row exactly once: a frozen input list, part files staged by
the tasks and published by the driver, resume by what is published, and a _SUCCESS manifest.

Layout under the output root (anomaly_core.scoring.schema says what the partitions are):
    dt=YYYY-MM-DD/product=NAME/version=V/part-<run_id>-<attempt>-<digest>.parquet   the rows
    _runs/<run_id>/run.json        what the run is (written first, with the input list)
    _runs/<run_id>/inputs.arrow    the input list, frozen at the run's first start
    _runs/<run_id>/attempts/<attempt>.json   each start of the run: the files published before
    _runs/<run_id>/staging/<attempt>/dt=../product=../version=../part-<digest>.parquet   staged
                                   by the row tasks, one file per product of a batch
    _runs/<run_id>/_SUCCESS.json   counts and timings (written last)
Readers skip `_runs` (names starting with "_" are hidden by pyarrow, pandas, Spark and Hive).

A run scores each image with its product's model (RunModel): one product for a single model, many
for a fleet run; every guarantee below holds per product because it holds per part file.

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
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.ipc as ipc

from anomaly_core import storage
from anomaly_core.scoring.index import INDEX_DIR, ScoredIndex
from anomaly_core.scoring.inputs import INPUT_SCHEMA, list_inputs, products_from_paths
from anomaly_core.scoring.schema import (
    NO_MODEL,
    PRODUCT_NAME,
    parquet_bytes,
    partition_path,
    score_table,
    utc_now,
)

RUNS_DIR = "_runs"


@dataclass(frozen=True)
class RunModel:
    """One product's model in a run: what its images are scored with and where its rows go."""

    product: str  # the partition's product=
    version: str  # the partition's version=: the registered version, else the weights digest
    model_version: str  # the artifact's weights digest (model.json), in every row
    detector: str
    uri: str  # the artifact
    registered: int | None = None  # the registered version (models:/<product>/<registered>)
    alias: str | None = None  # the alias it was resolved by (models:/<product>@<alias>)


@dataclass(frozen=True)
class RunAttempt:
    """One start of a run as its row tasks see it: what the run is and this attempt, without
    the input list (small and frozen: it travels to every task). run.json keeps all but
    `attempt`."""

    run_id: str
    output: str
    day: str  # YYYY-MM-DD of the partitions the run writes
    source: str
    incremental: bool
    created_at: str
    models: tuple[RunModel, ...]  # one per product with a model
    # this start of the run: its tasks stage part files under this name
    attempt: str = field(default_factory=lambda: new_attempt())
    fleet: bool = False  # products from the inputs, models from the registry (--fleet)

    def model(self, product: str | None) -> RunModel | None:
        """The product's model; None when it has none."""
        return next((m for m in self.models if m.product == product), None)

    def partition(self, product: str | None) -> str:
        """The folder of a product's rows (version=none: its images have no model; product=none:
        they have no product, or a name no partition can hold)."""
        if not (product and PRODUCT_NAME.fullmatch(product)):
            return partition_path(self.output, self.day, NO_MODEL, NO_MODEL)
        model = self.model(product)
        return partition_path(self.output, self.day, product, model.version if model else NO_MODEL)

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
    # this process's S3 retries when the attempt started: finish counts the driver's since
    retries_at_start: dict[str, int] = field(default_factory=storage.retries, repr=False)

    def describe(self) -> RunAttempt:
        """What the run is, and this attempt: what its row tasks receive."""
        return RunAttempt(**{k: getattr(self, k) for k in RunAttempt.__dataclass_fields__})

    def meta(self) -> dict[str, Any]:
        """run.json: what the run is (every attempt the same)."""
        return {k: v for k, v in asdict(self.describe()).items() if k != "attempt"}


def next_attempt(run: ScoreRun) -> ScoreRun:
    """Another attempt of the same run in this process, after its pipeline stopped on a lost
    node: a staging folder of its own; pending() on it plans what is not published yet (what
    the earlier attempt published counts as planned, so finish() keeps it)."""
    return replace(run, attempt=new_attempt(), planned_files=set())


def new_attempt() -> str:
    """A start of a run: UTC time (sortable) and a random suffix, no dashes."""
    return f"{utc_now():%Y%m%dT%H%M%S}{uuid.uuid4().hex[:6]}"


def default_run_id(day: str, model_version: str, source: str, incremental: bool) -> str:
    """Same command, same model (a fleet: "fleet"), same day -> same run, so starting it again
    resumes it."""
    digest = hashlib.sha256(f"{source}|{incremental}".encode()).hexdigest()[:8]
    return f"{day.replace('-', '')}-{model_version}-{digest}"


def scan_history(output: str, product: str, model_version: str) -> pa.Table:
    """(uri, etag, scored_at) of the latest error-free scoring of every image of a product by
    this model version, read from every part file under `output`: linear in history. Used once
    per output and product, to fill the index (index.ScoredIndex) of results written before it."""
    empty = pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                      "scored_at": pa.array([], pa.timestamp("us", tz="UTC"))})
    if not storage.exists(output):
        return empty
    files = [
        f for f in storage.list_files(output, extensions=[".parquet"])
        if f"/product={product}/" in f and f"/{RUNS_DIR}/" not in f and f"/{INDEX_DIR}/" not in f
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


def model_index(output: str, product: str, model_version: str) -> ScoredIndex:
    """The incremental state of a product's model version. An output that has no index for this
    product yet (results written before it) gets it filled once from the part files."""
    index = ScoredIndex(output, product, model_version)
    if not storage.exists(storage.join(output, INDEX_DIR, product)):
        index.add(scan_history(output, product, model_version), name="backfill")
    return index


def open_run(
    *,
    source: str,
    output: str,
    models: list[RunModel] | Callable[[list[str]], list[RunModel]],
    extensions: list[str],
    manifest: bool = False,
    inventory: str | None = None,
    since: str | None = None,
    date_prefix: str | None = None,
    incremental: bool = False,
    run_id: str | None = None,
    product_from: str | None = None,
) -> ScoreRun:
    """Start a run, or resume it when its input list was already frozen. The input is a folder
    or prefix, a manifest, or an S3 Inventory report filtered to a prefix; with `since` and
    `date_prefix` only the date folders from `since` on (anomaly_core.scoring.inputs).

    `models` is the one model of every image (a list of one), or, for a fleet run, a function
    from the products found in the inputs to their models; each image's product then comes
    from `product_from` (inputs.products_from_paths; "column": the manifest's). A resumed run
    keeps the models it started with."""
    now = utc_now()
    day = f"{now:%Y-%m-%d}"
    fleet = callable(models)
    what = "|".join(str(x) for x in (source, ",".join(extensions), inventory, since, date_prefix,
                                     product_from) if x is not None)
    if run_id is None:
        run_id = _unfinished_or(output, default_run_id(
            day, "fleet" if fleet else models[0].model_version, what, incremental))
    run_dir = storage.join(output, RUNS_DIR, run_id)
    meta_uri, inputs_uri = storage.join(run_dir, "run.json"), storage.join(run_dir, "inputs.arrow")
    if storage.exists(meta_uri):
        meta = json.loads(storage.read_bytes(meta_uri))
        meta.pop("attempt", None)
        meta["models"] = tuple(RunModel(**m) for m in meta["models"])
        if meta.get("fleet", False) != fleet or (
                not fleet and meta["models"][0].model_version != models[0].model_version):
            started = "a fleet run" if meta.get("fleet") else \
                f"model version {meta['models'][0].model_version}"
            raise ValueError(f"run {run_id} in {output} was started with {started}, not this "
                             "command's; pass another --run-id")
        data = storage.read_bytes(inputs_uri)
        inputs = ipc.open_file(pa.BufferReader(data)).read_all()
        return ScoreRun(**meta, resumed=True, inputs=inputs, attempt=new_attempt())
    inputs = list_inputs(source, extensions=extensions, manifest=manifest, inventory=inventory,
                         since=since, date_prefix=date_prefix, today=now.date())
    product = inputs.schema.get_field_index("product")
    if not fleet:
        inputs = inputs.set_column(product, "product",
                                   pa.array([models[0].product] * inputs.num_rows, pa.string()))
    elif product_from != "column":
        inputs = products_from_paths(inputs, source, product_from or "hive:product")
    if fleet:  # one product's images together: the model actors switch models between them
        inputs = inputs.sort_by([("product", "ascending"), ("uri", "ascending")])
        models = models(sorted(p for p in pc.unique(inputs["product"]).to_pylist() if p))
    if incremental:
        inputs = _with_prev_etags(inputs, output, models)
    run = ScoreRun(run_id, output, day, source, incremental, now.isoformat(timespec="seconds"),
                   tuple(models), attempt=new_attempt(), fleet=fleet, inputs=inputs)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, inputs.schema) as writer:
        writer.write_table(inputs)
    # The input list first, run.json second: run.json's presence means the list is complete.
    storage.write_bytes(inputs_uri, sink.getvalue().to_pybytes())
    storage.write_bytes(meta_uri, json.dumps(run.meta(), indent=2).encode())
    return run


def _unfinished_or(output: str, run_id: str) -> str:
    """`run_id` (today's run of a command), unless it has not started and an earlier day's run
    of the same command never finished: then that one, so a rerun after midnight resumes it
    instead of scoring its images again in a new run."""
    runs_dir = storage.join(output, RUNS_DIR)
    if not storage.exists(runs_dir):
        return run_id
    same = run_id.split("-", 1)[1]
    started, finished = set(), set()
    for f in storage.list_files(runs_dir, extensions=[".json"]):
        parts = f[len(runs_dir):].strip("/").split("/")
        if len(parts) == 2 and parts[0].split("-", 1)[-1] == same:
            (finished if parts[1] == "_SUCCESS.json" else started).add(parts[0])
    if run_id in started:
        return run_id
    unfinished = sorted(r for r in started - finished if r < run_id)
    return unfinished[-1] if unfinished else run_id


def _with_prev_etags(inputs: pa.Table, output: str, models: list[RunModel]) -> pa.Table:
    """prev_etag of every input its product's model version already scored. Only what can
    match tonight's images is read: time and memory follow tonight's inputs, not the history
    (anomaly_core/scoring/index.py)."""
    done = [model_index(output, m.product, m.model_version).lookup(
        inputs.filter(pc.equal(inputs["product"], m.product))["uri"]) for m in models]
    done = pa.concat_tables(done) if done else pa.table({"uri": pa.array([], pa.string()),
                                                         "etag": pa.array([], pa.string())})
    joined = inputs.drop_columns(["prev_etag"]).join(
        done.select(["uri", "etag"]).rename_columns(["uri", "prev_etag"]), keys="uri",
        join_type="left outer")
    return joined.select(INPUT_SCHEMA.names).sort_by([("product", "ascending"),
                                                      ("uri", "ascending")]).cast(INPUT_SCHEMA)


def part_files(run: ScoreRun) -> list[str]:
    """The run's published part files (every attempt's, every product's)."""
    day = storage.join(run.output, f"dt={run.day}")
    if not storage.exists(day):
        return []
    prefix = f"part-{run.run_id}-"
    files = storage.list_files(day, extensions=[".parquet"])
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


def publish_without_model(run: ScoreRun, todo: pa.Table, usable: set[str],
                          reason: Callable[[str | None], str]) -> pa.Table:
    """The driver's rows for the images whose product has no usable model (or that have no
    product): an error row each, `reason(product)` after its URI, published at once; returns
    the rest."""
    known = pa.array(sorted(usable), pa.string())
    has = pc.fill_null(pc.is_in(todo["product"], value_set=known), False)
    now, groups = utc_now(), {}
    for row in todo.filter(pc.invert(has)).select(["uri", "etag", "size_bytes", "product"]).to_pylist():
        product = row.pop("product")
        groups.setdefault(product, []).append({
            **row, "model_version": NO_MODEL, "error": f"{row['uri']}: {reason(product)}",
            "scored_at": now, "run_id": run.run_id})
    for product, rows in groups.items():
        for i in range(0, len(rows), 10_000):
            publish_part(run, stage_part(run, rows[i:i + 10_000], product))
    return todo.filter(has)


def input_blocks(todo: pa.Table, cpus: float, batch_size: int, per_cpu: int = 4,
                 max_rows: int = 1024) -> list[pa.Table]:
    """The input list as blocks for Ray Data: a few per CPU of the cluster, each at least a batch
    and at most `max_rows` images. Not one per few rows (a million inputs were 15,625 blocks of
    64), and not a few huge ones either: a decode task holds its CPU until its whole block is
    decoded, so blocks of 100,000 images starve the row tasks of a small cluster for minutes
    (measured: no first rows after 150 s with 8 blocks of 125,000 on 2 CPUs). A block holds
    one product's images (the list is sorted by product), so that batches run through one
    model; only a batch that Ray Data makes of two blocks' ends can span two."""
    n = todo.num_rows
    size = min(max(-(-n // (per_cpu * max(int(cpus), 1))), batch_size), max(max_rows, batch_size))
    if n == 0:
        return []
    products = pc.fill_null(todo["product"].combine_chunks(), "")
    changes = pc.not_equal(products.slice(1), products.slice(0, n - 1))
    starts = [0, *(i + 1 for i in pc.indices_nonzero(changes).to_pylist()), n]
    return [todo.slice(i, min(size, end - i))
            for start, end in zip(starts, starts[1:]) for i in range(start, end, size)]


class Progress:
    """A run's progress: done/total, images/s, ETA, as a line every few seconds."""

    def __init__(self, total: int, every: float, log: Callable[[str], Any] = print) -> None:
        self.total, self.every, self.done, self.errors, self.log = total, every, 0, 0, log
        self.start = self.last = time.perf_counter()
        self.first: float | None = None  # seconds until the first rows came out
        self.loads = self.evictions = 0  # models the actors loaded, and evicted for others
        self.retries = 0  # S3 calls the decode and row tasks retried
        self.nodes_lost = 0  # Ray nodes lost during the run (the job's NodeWatch counts)
        self.redone = 0  # images scheduled again by a new attempt after a lost node

    @property
    def counts(self) -> dict[str, Any]:
        """For _SUCCESS.json: models the actors loaded, and evicted to make room for others;
        S3 calls the tasks retried."""
        return {"models_loaded": {"loads": self.loads, "evictions": self.evictions},
                "storage_retries_in_tasks": self.retries}

    def update(self, images: int, errors: int, loads: int = 0, evictions: int = 0,
               retries: int = 0) -> None:
        """Count a row task's images and errors (and the model loads and evictions and S3
        retries of the batches it wrote); log a line when one is due."""
        self.done += images
        self.errors += errors
        self.loads += loads
        self.evictions += evictions
        self.retries += retries
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
                 f"{rate:.1f} images/s, ETA {eta:.0f} s"
                 + (f", {self.retries} S3 calls retried" if self.retries else "")
                 + (f", {self.nodes_lost} node(s) lost" if self.nodes_lost else "")
                 + (f", {self.redone} images redone" if self.redone else ""))

    def node_lost(self) -> None:
        self.nodes_lost += 1

    def state(self) -> str:
        """Where the run stands, for a log line: images written of all."""
        return (f"{self.done}/{self.total} images written, "
                f"{100 * self.done / max(self.total, 1):.0f}%")


def publish_all(run: ScoreRun, results: Iterable[dict[str, Any]],
                progress: Progress) -> dict[str, list[str]]:
    """The driver's side of the row stage: publish each staged part file once its task has
    returned (a straggler of a killed attempt never writes where readers look), count progress;
    returns the nodes that ran the model and the rows."""
    nodes: dict[str, set] = {"model": set(), "rows": set()}
    with ThreadPoolExecutor(8) as publisher:
        published = []
        for counts in results:
            for staged in filter(None, counts["staged"].split("\n")):
                published.append(publisher.submit(publish_part, run, staged))
            progress.update(counts["images"], counts["errors"], counts["model_loads"],
                            counts["model_evictions"], counts["storage_retries"])
            nodes["model"].update(n for n in counts["model_node"].split(",") if n)
            nodes["rows"].add(counts["rows_node"])
        for future in published:
            future.result()
    return {k: sorted(v) for k, v in nodes.items()}


def summary_text(run: ScoreRun, summary: dict[str, Any]) -> str:
    """The table a score job ends with."""
    table = [("run", run.run_id), ("inputs", summary["inputs"]), ("scored", summary["scored"]),
             ("errors", summary["errors"]), ("skipped", summary["skipped"]),
             ("images/s", summary["images_per_s"]),
             ("rows in", storage.join(run.output, f"dt={run.day}"))]
    lines = [f"{k:<10} {v}" for k, v in table]
    products = summary["products"]
    if len(products) > 1 or run.fleet:
        lines.append(f"\n{'product':<20} {'version':>8} {'images':>7} {'scored':>7} {'errors':>7}"
                     f" {'anomalous':>9}")
        lines += [f"{p:<20} {c['version']:>8} {c['rows']:>7} {c['scored']:>7} {c['errors']:>7}"
                  f" {c['anomalous']:>9}" for p, c in sorted(products.items())]
    else:
        lines += [f"{'model':<10} {c['model_uri']} (version {c['version']})"
                  for c in products.values()]
    return "\n".join(lines)


def stage_part(run: ScoreRun | RunAttempt, rows: list[dict[str, Any]],
               product: str | None) -> str | None:
    """A row task's part file of one product's rows, written atomically into its attempt's
    staging folder under the product's partition; its name is a digest of its URIs (same rows,
    same name). Returns its URI (None for no rows)."""
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r["uri"])
    digest = hashlib.sha256("\n".join(r["uri"] for r in rows).encode()).hexdigest()[:20]
    partition = run.partition(product)[len(run.output.rstrip("/")) + 1:]
    uri = storage.join(run.staging, partition, f"part-{digest}.parquet")
    storage.write_bytes(uri, parquet_bytes(score_table(rows)))
    return uri


def publish_part(run: ScoreRun, staged: str) -> str:
    """The driver's step: a staged part file of this attempt into its partition (readers see it
    whole or not at all). Returns its published URI."""
    partition, _, name = staged[len(run.staging) + 1:].rpartition("/")
    if (not staged.startswith(run.staging + "/") or not name.startswith("part-")
            or not partition.startswith(f"dt={run.day}/product=")):
        raise ValueError(f"{staged} is not a part file staged by attempt {run.attempt} of run "
                         f"{run.run_id}")
    uri = storage.join(run.output, partition,
                       f"part-{run.run_id}-{run.attempt}-{name[len('part-'):]}")
    storage.move(staged, uri)
    return uri


def _attempt_of(run: ScoreRun, uri: str) -> str:
    return uri.rsplit("/", 1)[-1][len(f"part-{run.run_id}-"):].split("-", 1)[0]


def finish(run: ScoreRun, timings: dict[str, float | None], extra: dict[str, Any] | None = None,
           per_product: dict[str, dict[str, Any]] | None = None) -> dict:
    """Drop what a dead attempt published after this one planned, clear the staging folders,
    count what the run's part files hold (per product) and write _SUCCESS.json; returns the
    summary: the run's totals, `extra`, and under "products" each product's counts, model and
    `per_product` entry."""
    files = part_files(run)
    late = [f for f in files
            if f not in run.planned_files and _attempt_of(run, f) != run.attempt]
    for f in late:  # its rows were scheduled again by this attempt: they would repeat
        storage.delete(f)
    files = [f for f in files if f not in late]
    storage.delete(storage.join(run.run_dir, "staging"))
    partitions: dict[str, list[str | None]] = {}  # products without one share product=none
    for product in sorted(set(run.inputs["product"].to_pylist()), key=str):
        partitions.setdefault(run.partition(product), []).append(product)
    products = {}
    for partition, names in partitions.items():
        model = run.model(names[0]) if len(names) == 1 else None
        mine = [f for f in files if f.startswith(partition + "/")]
        rows = read_parquet(mine, ["uri", "etag", "scored_at", "error", "is_anomalous"])
        if model:
            # The run's error-free rows into the incremental state (again after a resume: the
            # batch is replaced, not repeated); read from tonight's files only.
            scored = rows.filter(pc.field("error").is_null()) if rows.num_rows else rows
            model_index(run.output, model.product, model.model_version).add(
                scored.select(["uri", "etag", "scored_at"]), name=run.run_id)
        n_rows = rows.num_rows
        n_errors = n_rows - (rows["error"].null_count if n_rows else 0)
        anomalous = pc.sum(rows["is_anomalous"]).as_py() if n_rows else 0
        inputs = sum(pc.sum(pc.equal(run.inputs["product"], p)).as_py() or 0 if p is not None
                     else run.inputs["product"].null_count for p in names)
        name = partition.rsplit("/product=", 1)[1].split("/", 1)[0]
        products[name] = {
            **(asdict(model) if model else {"product": name, "version": NO_MODEL}),
            "inputs": inputs, "skipped": inputs - n_rows,
            "rows": n_rows, "scored": n_rows - n_errors, "errors": n_errors,
            "anomalous": anomalous or 0, "files": len(mine), "partition": partition,
            **((per_product or {}).get(names[0]) or {}),
        }
    summary = {
        **run.meta(),
        "attempt": run.attempt,
        "inputs": run.inputs.num_rows,
        **{k: sum(p[k] for p in products.values()) for k in ("rows", "scored", "errors")},
        "skipped": run.inputs.num_rows - sum(p["rows"] for p in products.values()),
        "files": len(files),
        "resumed": run.resumed,
        "late_files_removed": len(late),
        "finished_at": utc_now().isoformat(timespec="seconds"),
        "timings_s": {k: None if v is None else round(v, 3) for k, v in timings.items()},
        **(extra or {}),
        "products": products,
    }
    # Every S3 call retried: by the tasks (reported with their rows) and by this driver.
    driver = Counter(storage.retries())
    driver.subtract(run.retries_at_start)
    tasks = summary.pop("storage_retries_in_tasks", 0)
    summary["storage_retries"] = {"tasks": tasks, "driver": {k: v for k, v in driver.items() if v},
                                  "total": tasks + driver.total()}
    body = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    storage.write_bytes(storage.join(run.run_dir, "_SUCCESS.json"), body)
    return summary
