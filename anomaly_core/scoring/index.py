"""What a model version already scored, as a compact sorted index whose lookups read only what
can match tonight's images: the incremental state of nightly scoring runs.

The full scan of the results (`runs.scan_history`) answers "latest etag per uri among rows scored
without error" by reading every row ever written (linear in history). This index answers the same
question for a given list of uris, reading the index's footers (O(files), files = O(log history))
and only the row groups whose uri range contains one of those uris.

Layout, under <output>/_index/<product>/<model_version>/ (hidden from readers of the results:
names starting with "_"; and no "product=" in the path, which `runs.scan_history` would take for
a results partition and read):
    index.json                 the state: the current data files, oldest first, with row counts
    delta-<name>-<id>.parquet  one added batch (a run's rows), named after the caller's name
    merged-<id>.parquet        several files compacted into one
Every data file holds columns uri, etag, scored_at (timestamp[us, UTC], as in the score rows),
sorted by uri, one row per uri (its latest scoring), row groups of `row_group_rows` (8192) rows,
min/max statistics on uri (uri DELTA_BYTE_ARRAY-encoded: sorted uris share long prefixes), zstd.

Row groups of 8192 rows, not 64k (brief's design changed here): tonight's new images sort into
a few narrow key ranges (one per camera line and day), which fall inside the row group of every
file that spans the end of that line's keys; those row groups hold none of tonight's images but
must be read. Rows read per night are about files x lines x row_group_rows, so smaller row
groups read less: bench/nightly_year.py, 60 nights x 20,000 images, 1.2M history rows: 64k-row
groups read 1.18M rows (all) and planned in 0.55 s (87 MB), 8192-row groups 0.69M rows in
0.20 s (33 MB), on a shared 2-core machine. The cost: a bigger footer (~0.5 kB per row group,
~2 MB over 36M rows, read every night) and one GET per row group read on S3.

Invariants:
- A data file never changes once written; index.json is the only object that changes, and it is
  written last, in one write_bytes (an atomic rename locally, one PUT on S3). A crash at any
  point leaves files that index.json does not list (orphans), never a broken index; lookups read
  only listed files. So data files get unique names (the caller's name plus a random id) rather
  than being overwritten in place: re-adding a name replaces that batch's entry in index.json
  (the old file becomes an orphan), which gives "re-adding does not duplicate" without ever
  overwriting a listed file (brief's design changed here for that reason).
- add() writes its delta and lists it in index.json before compacting, then writes index.json
  again after compacting: a crash during a (possibly long) merge loses no added batch.
- Orphans are deleted by a later compaction: one that deletes every .parquet file listed neither
  in the state it started from nor in the state it wrote. Files merged away are therefore kept
  until the next compaction, so a lookup that read the previous state can still read them (a
  lookup that finds a file gone reads the state again, once).
- One writer per index at a time (the driver of the run that just finished); any number of
  concurrent lookups. Two concurrent add()s could lose one's batch (last index.json wins, and a
  sweep may delete the other's new file): its images are then planned from their previous
  scoring (rescored, unless a file went back to the etag scored before).

Size-tiered compaction (in add): a file's tier is floor(log_fanin(rows)); whenever `fanin` (4)
files share a tier, they are merged into one, which may cascade. A row is rewritten once per tier
it climbs, so the amortized write cost per added row is O(log history) and there are at most
(fanin - 1) files per tier, O(log history) files. A merge streams: it reads one batch (64k rows)
of each input at a time and writes every row up to the smallest "last uri" among them (a k-way
merge of sorted runs), so its memory is O(fanin x batch), whatever the files' sizes. Per uri it
keeps the row with the latest scored_at (ties: the newer file).

Re-adding a name whose batch was already merged adds its rows again as a new delta: lookups are
unchanged (same uri, same scored_at) and the copies collapse at the next merge. Always add a
batch's complete rows (e.g. all rows of a run, again after a resume).

Lookup (IndexLookup): sort tonight's uris once; per data file (a few threads) open it for random access, read
the footer, keep the row groups whose [min uri, max uri] contains one of tonight's uris (numpy
searchsorted over the sorted uris), read those (uri, etag, scored_at), keep tonight's uris among
them, then keep the latest scored_at per uri across files. Memory and time: tonight's uris plus
the row groups that can match. `last_lookup` says what was read (files, row groups, rows).
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from anomaly_core import storage
from anomaly_core.scoring.schema import utc_now

INDEX_DIR = "_index"
STATE_FILE = "index.json"
FORMAT = 1
SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()),
                    ("scored_at", pa.timestamp("us", tz="UTC"))])
ROW_GROUP_ROWS = 1 << 13
MERGE_BATCH_ROWS = 1 << 16
FANIN = 4
LOOKUP_THREADS = 8
_WRITE_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": False,
    "column_encoding": {"uri": "DELTA_BYTE_ARRAY", "scored_at": "DELTA_BINARY_PACKED"},
    "write_statistics": ["uri"],
}


def _empty() -> pa.Table:
    return SCHEMA.empty_table()


def _latest(table: pa.Table) -> pa.Table:
    """One row per uri, sorted by uri: the latest scored_at (ties: the first row, the sort is
    stable)."""
    if table.num_rows <= 1:
        return table
    table = table.sort_by([("uri", "ascending"), ("scored_at", "descending")])
    uris = table["uri"].combine_chunks()
    first = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def _sorted_uris(uris: Any) -> pa.Array:
    """Distinct, non-null uris as one sorted string array."""
    if isinstance(uris, pa.ChunkedArray):
        uris = uris.combine_chunks()
    elif not isinstance(uris, pa.Array):
        uris = pa.array(list(uris), pa.string())
    uris = pc.unique(uris.cast(pa.string()).drop_null())
    return uris.take(pc.sort_indices(uris))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name)[:80]


def _merge_sorted(files: list[pq.ParquetFile]) -> Iterable[pa.Table]:
    """A k-way streaming merge of files sorted by uri, in sorted chunks with the latest
    scored_at per uri (ties: the earlier file): one batch of each file held at a time."""
    batches = [f.iter_batches(batch_size=MERGE_BATCH_ROWS, columns=SCHEMA.names) for f in files]
    buffers: list[pa.Table | None] = [None] * len(files)
    while True:
        for i, source in enumerate(batches):
            while source is not None and (buffers[i] is None or buffers[i].num_rows == 0):
                batch = next(source, None)
                if batch is None:
                    batches[i] = source = None
                else:
                    buffers[i] = pa.Table.from_batches([batch]).cast(SCHEMA)
        live = [b for b in buffers if b is not None and b.num_rows]
        if not live:
            return
        # Every input's later rows sort after its buffer's last uri, so every row up to the
        # smallest of those last uris is here now: emit them, keep the rest.
        bound = min(b["uri"][-1].as_py() for b in live)
        parts = []
        for i, b in enumerate(buffers):
            if b is None or b.num_rows == 0:
                continue
            take = pc.sum(pc.less_equal(b["uri"], bound)).as_py() or 0
            parts.append(b.slice(0, take))
            buffers[i] = b.slice(take)
        yield _latest(pa.concat_tables(parts))


class ScoredIndex:
    """The latest etag per uri that one model version scored without error, under
    <output>/_index/<model>/<model_version>/: its data files and the state that lists them,
    batches added with size-tiered compaction; lookups read through IndexLookup."""

    def __init__(self, output: str, model: str, model_version: str, *, row_group_rows: int = ROW_GROUP_ROWS,
                 fanin: int = FANIN):
        if fanin < 2 or row_group_rows < 1:
            raise ValueError("fanin must be >= 2 and row_group_rows >= 1")
        self.root = storage.join(output, INDEX_DIR, model, model_version)
        self.model_version = model_version
        self.row_group_rows = row_group_rows
        self.fanin = fanin
        self.last_lookup: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------------

    def _uri(self, file: str) -> str:
        return storage.join(self.root, file)

    def exists(self) -> bool:
        return storage.exists(self._uri(STATE_FILE))

    def _state(self) -> dict[str, Any]:
        if not self.exists():
            return {"format": FORMAT, "files": []}
        state = json.loads(storage.read_bytes(self._uri(STATE_FILE)))
        if state.get("format") != FORMAT:
            raise ValueError(f"{self._uri(STATE_FILE)} has format {state.get('format')}, "
                             f"this code reads {FORMAT}")
        return state

    def _write_state(self, files: list[dict[str, Any]]) -> None:
        state = {"format": FORMAT, "model_version": self.model_version,
                 "updated_at": utc_now().isoformat(timespec="seconds"),
                 "rows": sum(e["rows"] for e in files), "files": files}
        storage.write_bytes(self._uri(STATE_FILE), json.dumps(state, indent=1).encode())

    def files(self) -> list[dict[str, Any]]:
        """The current data files, oldest first: {"file", "rows", "name"} (name: the batch's
        name for a delta, None for a merged file)."""
        return self._state()["files"]

    def open_file(self, file: str):
        """A listed data file for random access: its footer and chosen row groups only."""
        uri = self._uri(file)
        fs, path = storage.filesystem(uri)
        try:
            return fs.open_input_file(path)
        except OSError as exc:
            raise storage.storage_error(exc, uri, "read") from exc

    # -- writing -----------------------------------------------------------------------------

    def add(self, rows: pa.Table, name: str) -> None:
        """Add a batch of rows scored without error (columns uri, etag, scored_at; others are
        ignored, rows with a non-null `error` dropped). Re-adding `name` replaces its batch while
        that is not merged yet. An empty batch changes nothing."""
        if "model_version" in rows.column_names:
            versions = pc.unique(rows["model_version"].drop_null()).to_pylist()
            if any(v != self.model_version for v in versions):
                raise ValueError(f"rows of model versions {versions} added to the index of "
                                 f"{self.model_version}")
        if "error" in rows.column_names:
            rows = rows.filter(pc.is_null(rows["error"]))
        rows = rows.select(SCHEMA.names).cast(SCHEMA)
        rows = _latest(rows.filter(pc.is_valid(rows["uri"])))
        if rows.num_rows == 0:
            return
        before = self._state()["files"]
        file = f"delta-{_safe(name)}-{uuid.uuid4().hex[:12]}.parquet"
        self._write(file, [rows])
        files = [e for e in before if e.get("name") != name]
        files.append({"file": file, "rows": rows.num_rows, "name": name})
        self._write_state(files)  # the batch is durable before any (long) merge
        compacted = self._compact(files)
        if compacted is not files:
            self._write_state(compacted)
            self._sweep({e["file"] for e in before} | {e["file"] for e in compacted})

    def _tier(self, rows: int) -> int:
        return int(math.log(max(rows, 1)) / math.log(self.fanin) + 1e-9)

    def _compact(self, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Merge files sharing a tier until no tier holds `fanin` files (lowest tier first)."""
        out = files
        while True:
            tiers: dict[int, list[int]] = {}
            for i, entry in enumerate(out):
                tiers.setdefault(self._tier(entry["rows"]), []).append(i)
            full = sorted(t for t, members in tiers.items() if len(members) >= self.fanin)
            if not full:
                return out
            members = tiers[full[0]]
            merged = self._merge([out[i] for i in members])
            # The merged file takes the place of its newest input (order only breaks ties).
            out = [merged if i == members[-1] else e for i, e in enumerate(out)
                   if i not in members[:-1]]

    def _merge(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """Several files merged into one, latest scored_at per uri."""
        file = f"merged-{uuid.uuid4().hex[:16]}.parquet"
        readers = [self.open_file(e["file"]) for e in reversed(entries)]  # newest first: wins ties
        try:
            n = self._write(file, _merge_sorted([pq.ParquetFile(f) for f in readers]))
        finally:
            for f in readers:
                f.close()
        return {"file": file, "rows": n, "name": None}

    def _write(self, file: str, chunks: Iterable[pa.Table]) -> int:
        """Write sorted chunks as one Parquet file of whole row groups; returns its rows. Not
        atomic, and need not be: the file is unlisted until index.json names it."""
        uri = self._uri(file)
        fs, path = storage.filesystem(uri)
        rg, rows = self.row_group_rows, 0
        try:
            if not storage.is_s3(uri):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with fs.open_output_stream(path) as out, \
                    pq.ParquetWriter(out, SCHEMA, **_WRITE_OPTIONS) as writer:
                pending: list[pa.Table] = []
                held = 0
                for chunk in chunks:
                    pending.append(chunk)
                    held += chunk.num_rows
                    if held >= rg:
                        table = pa.concat_tables(pending)
                        whole = held // rg * rg
                        writer.write_table(table.slice(0, whole), row_group_size=rg)
                        rows += whole
                        pending, held = [table.slice(whole)], held - whole
                if held:
                    writer.write_table(pa.concat_tables(pending), row_group_size=rg)
                    rows += held
        except OSError as exc:
            raise storage.storage_error(exc, uri, "write") from exc
        return rows

    def _sweep(self, keep: set[str]) -> None:
        """Delete the data files listed in neither state (crash leftovers, replaced deltas,
        files merged away by the previous compaction)."""
        for uri in storage.list_files(self.root, extensions=[".parquet"]):
            if uri.rsplit("/", 1)[-1] not in keep:
                storage.delete(uri)

    # -- reading -----------------------------------------------------------------------------

    def lookup(self, uris: Any) -> pa.Table:
        """(uri, etag) of the latest scoring of each of `uris` (any order, any iterable or Arrow
        array of strings) that is in the index, sorted by uri; `last_lookup` says what it read."""
        lookup = IndexLookup(self, uris)
        found = lookup.run()
        self.last_lookup = lookup.stats
        return found


class IndexLookup:
    """One lookup of a list of uris in a ScoredIndex: the uris sorted once, then per listed data
    file (a few threads) its footer and only the row groups whose uri range holds one of them.
    `stats`: the files, row groups and rows it read."""

    def __init__(self, index: ScoredIndex, uris: Any) -> None:
        self.index = index
        self.keys = _sorted_uris(uris)
        self.sorted_keys = self.keys.to_numpy(zero_copy_only=False)
        self.stats = {"uris": len(self.keys), "files": 0, "row_groups": 0, "row_groups_read": 0,
                      "rows_read": 0}

    def run(self) -> pa.Table:
        """(uri, etag) of the latest scoring of each uri found, sorted by uri."""
        if len(self.keys) == 0:
            return _empty().select(["uri", "etag"])
        try:
            return self._read(self.index.files())
        except storage.StorageError:
            # A file the state listed was merged away and swept meanwhile: read the state again.
            return self._read(self.index.files())

    def _read(self, files: list[dict[str, Any]]) -> pa.Table:
        newest_first = [e["file"] for e in reversed(files)]
        threads = max(1, min(LOOKUP_THREADS, len(newest_first)))
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(self._matches, newest_first))
        stats = {"uris": len(self.keys), "files": len(newest_first), "row_groups": 0,
                 "row_groups_read": 0, "rows_read": 0}
        self.stats = stats
        parts = []
        for table, counts in results:
            parts.append(table)
            for key, value in counts.items():
                stats[key] += value
        if not parts:
            return _empty().select(["uri", "etag"])
        return _latest(pa.concat_tables(parts)).select(["uri", "etag"])

    def _matches(self, file: str) -> tuple[pa.Table, dict[str, int]]:
        """The rows of one data file whose uri is looked up, reading only the row groups whose
        [min uri, max uri] holds one (numpy searchsorted over the sorted uris)."""
        keys, sorted_keys = self.keys, self.sorted_keys
        f = self.index.open_file(file)
        try:
            pf = pq.ParquetFile(f, pre_buffer=True)
            meta = pf.metadata
            column = pf.schema_arrow.get_field_index("uri")
            n = meta.num_row_groups
            lo = np.zeros(n, dtype=np.int64)
            hi = np.full(n, len(sorted_keys), dtype=np.int64)
            known = []
            mins, maxs = [], []
            for g in range(n):
                st = meta.row_group(g).column(column).statistics
                if st is not None and st.has_min_max:
                    known.append(g)
                    mins.append(st.min)
                    maxs.append(st.max)
            if known:
                lo[known] = np.searchsorted(sorted_keys, np.array(mins, dtype=object), "left")
                hi[known] = np.searchsorted(sorted_keys, np.array(maxs, dtype=object), "right")
            parts, rows_read = [], 0
            chosen = np.nonzero(hi > lo)[0]
            for g in chosen:
                table = pf.read_row_group(int(g), columns=SCHEMA.names).cast(SCHEMA)
                rows_read += table.num_rows
                candidates = keys.slice(int(lo[g]), int(hi[g] - lo[g]))
                parts.append(table.filter(pc.is_in(table["uri"], value_set=candidates)))
        except OSError as exc:
            raise storage.storage_error(exc, self.index._uri(file), "read") from exc
        finally:
            f.close()
        table = pa.concat_tables(parts) if parts else _empty()
        return table, {"row_groups": n, "row_groups_read": len(chosen), "rows_read": rows_read}
