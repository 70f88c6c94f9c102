"""The scoring input list, built in Arrow so that it scales to tens of millions of images.

Four ways to say which images to score, all returning one table of INPUT_SCHEMA:

  folder / prefix   a local folder or s3://bucket/prefix, listed recursively; each page of the
                    listing becomes an Arrow RecordBatch at once (no Python lists of every URI)
  manifest          a CSV or Parquet file with a `uri` column (optional size_bytes, etag, and
                    product for a fleet run)
  S3 Inventory      the manifest.json of an S3 Inventory report (CSV or Parquet data files),
                    filtered to the --input prefix and the extensions, without listing the bucket
  since/date_prefix for date-partitioned sources: only the prefixes of the dates from `since` to
                    today are listed (or kept from the inventory)

Everything goes through anomaly_core.storage (local paths and s3://, --s3-endpoint honoured).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from anomaly_core import storage

INPUT_SCHEMA = pa.schema(
    [("uri", pa.string()), ("size_bytes", pa.int64()), ("etag", pa.string()),
     ("prev_etag", pa.string()),
     # the image's product: a manifest's `product` column, else set by products_from_paths
     ("product", pa.string())]
)

# CSV inventory field names (fileSchema) -> the Parquet/ORC column names AWS uses for them.
_INVENTORY_FIELDS = {
    "Bucket": "bucket",
    "Key": "key",
    "Size": "size",
    "ETag": "e_tag",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
}


def list_inputs(
    source: str,
    *,
    extensions: Iterable[str],
    manifest: bool = False,
    inventory: str | None = None,
    since: date | str | None = None,
    date_prefix: str | None = None,
    today: date | str | None = None,
) -> pa.Table:
    """The images to score, as a table of INPUT_SCHEMA (prev_etag all null).

    source       a folder / s3://bucket/prefix to list, or (manifest=True) the manifest file, or
                 (with inventory) the prefix whose images the inventory is filtered to
    extensions   wanted file extensions (".png" or "png"); not applied to a manifest
    manifest     `source` is a CSV/Parquet file with a `uri` column (optional size_bytes, etag)
    inventory    URI of an S3 Inventory manifest.json (CSV or Parquet report) listing `source`'s
                 bucket: read instead of listing the bucket
    since        with date_prefix: the first date to take (date or "YYYY-MM-DD")
    date_prefix  strftime pattern of a day's folder relative to source, e.g. "%Y/%m/%d/" or
                 "dt=%Y-%m-%d/"; only the days from `since` to `today` are listed
    today        the last date to take (default: today, UTC)
    """
    extensions = list(extensions or [])
    if manifest and inventory:
        raise ValueError(f"--manifest {source} and --inventory {inventory} both name the inputs; "
                         "pass one of them")
    if (since is None) != (date_prefix is None):
        raise ValueError("--since and --date-prefix go together: pass both (e.g. --since "
                         "2024-05-01 --date-prefix '%Y/%m/%d/') or neither")
    if manifest:
        if since is not None:
            raise ValueError(f"--since/--date-prefix select folders to list; manifest {source} "
                             "already names every image: drop them or the manifest")
        return _read_manifest(source)
    prefixes = [source]
    if since is not None:
        prefixes = date_prefixes(source, date_prefix, since, today)
    if inventory:
        return _read_inventory(inventory, source, prefixes, extensions)
    if since is None:
        return _list(source, extensions)
    return _list_dates(source, prefixes, extensions)


def products_from_paths(inputs: pa.Table, source: str, rule: str) -> pa.Table:
    """The inputs with each image's product taken from its path (a fleet run):
    rule "hive:KEY"   the value of the folder KEY=<product> anywhere in the path
    rule "folder:N"   the name of the N-th folder under `source` (1: the first level)
    An image the rule finds no product in gets null (an error row names why)."""
    kind, _, arg = rule.partition(":")
    relative = pc.utf8_slice_codeunits(inputs["uri"], len(source.rstrip("/")) + 1)
    if kind == "hive" and arg:
        found = pc.extract_regex(inputs["uri"], rf"(?:^|/){re.escape(arg)}=(?P<p>[^/]+)/")
    elif kind == "folder" and arg.isdigit() and int(arg) >= 1:
        found = pc.extract_regex(relative, rf"^(?:[^/]+/){{{int(arg) - 1}}}(?P<p>[^/]+)/")
    else:
        raise ValueError(f"--product-from {rule!r}: expected hive:KEY (e.g. hive:product for "
                         ".../product=washer/...) or folder:N (e.g. folder:1, the first folder "
                         f"under {source}), or column for a manifest's `product` column")
    products = pc.struct_field(found, [0])
    return inputs.set_column(inputs.schema.get_field_index("product"), "product", products)


# -- folder / prefix listing ---------------------------------------------------------------


def _page_batch(page: list[tuple[str, int, str | None]]) -> pa.RecordBatch:
    uris, sizes, etags = zip(*page)
    return pa.RecordBatch.from_arrays(
        [pa.array(uris, pa.string()), pa.array(sizes, pa.int64()), pa.array(etags, pa.string()),
         pa.nulls(len(page), pa.string()), pa.nulls(len(page), pa.string())],
        schema=INPUT_SCHEMA,
    )


def _batches(uri: str, extensions: list[str]) -> list[pa.RecordBatch]:
    return [_page_batch(page) for page in
            storage.list_objects(uri, extensions=extensions or None)
            if page]


def _list(source: str, extensions: list[str]) -> pa.Table:
    return pa.Table.from_batches(_batches(source, extensions), schema=INPUT_SCHEMA)


def date_prefixes(source: str, pattern: str, since: date | str, today: date | str | None = None
                  ) -> list[str]:
    """The distinct folders `source` + strftime(pattern) of the days from `since` to `today`,
    oldest first."""
    first, last = _as_date(since, "--since"), _as_date(today, "today") if today else None
    last = last or datetime.now(UTC).date()
    bad = f"date prefix {pattern!r}"
    if not pattern or "%" not in pattern:
        raise ValueError(f"{bad} has no date in it; give a strftime pattern relative to --input "
                         "such as '%Y/%m/%d/' or 'dt=%Y-%m-%d/'")
    if pattern.startswith("/") or "://" in pattern or ".." in pattern.split("/"):
        raise ValueError(f"{bad} must be relative to --input {source} (no leading '/', no "
                         "'://', no '..'), e.g. '%Y/%m/%d/'")
    if first > last:
        raise ValueError(f"--since {first} is after today ({last}); pass a date up to today")
    out: list[str] = []
    day = first
    while day <= last:
        try:
            rel = day.strftime(pattern)
        except ValueError as exc:
            raise ValueError(f"{bad} is not a valid strftime pattern ({exc}); use e.g. "
                             "'%Y/%m/%d/'") from exc
        if "%" in rel:  # an unknown directive stays as it is
            raise ValueError(f"{bad} has a directive strftime does not know (gives {rel!r}); "
                             "use %Y, %m, %d, %j ...")
        uri = storage.join(source, rel)
        if not out or out[-1] != uri:
            out.append(uri)
        day += timedelta(days=1)
    return list(dict.fromkeys(out))


def _as_date(value: date | str, what: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a date; use YYYY-MM-DD") from None


def _list_dates(source: str, prefixes: list[str], extensions: list[str]) -> pa.Table:
    """List each day's folder; a day whose folder does not exist is skipped."""
    batches: list[pa.RecordBatch] = []
    found = False
    first_error: storage.StorageError | None = None
    for prefix in prefixes:
        try:
            batches += _batches(prefix, extensions)
            found = True
        except storage.StorageError as exc:
            # An absent or empty day folder: skip it. Anything else (access denied, not
            # reachable, a file where a folder should be): raise it.
            empty = str(exc).startswith("nothing under")  # list_objects' own message
            if storage.exists(prefix) and not empty:
                raise
            first_error = first_error or exc
    if not found:
        if storage.is_s3(source):
            bucket = source[len("s3://"):].split("/", 1)[0]
            if not storage.exists(f"s3://{bucket}"):
                raise first_error  # names the missing bucket and the endpoint
        shown = prefixes if len(prefixes) <= 6 else [*prefixes[:3], "...", *prefixes[-2:]]
        raise storage.StorageError(
            f"nothing under {source} for the {len(prefixes)} day folder(s) from --since "
            f"(tried {', '.join(shown)}); check --input, --since and --date-prefix"
        )
    return pa.Table.from_batches(batches, schema=INPUT_SCHEMA)


# -- manifest of URIs ------------------------------------------------------------------------


def _read_manifest(source: str) -> pa.Table:
    data = storage.read_bytes(source)
    lower = source.lower()
    try:
        if lower.endswith((".csv", ".csv.gz")):
            opts = pacsv.ConvertOptions(column_types={"uri": pa.string(), "etag": pa.string()})
            stream = pa.input_stream(pa.py_buffer(data),
                                     compression="gzip" if data[:2] == b"\x1f\x8b" else None)
            table = pacsv.read_csv(stream, convert_options=opts)
        elif lower.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
            import pyarrow.parquet as pq

            table = pq.read_table(pa.py_buffer(data))
        else:
            raise ValueError(f"manifest {source} is neither .csv nor .parquet; write the list of "
                             "URIs as CSV or Parquet with a `uri` column")
    except pa.ArrowInvalid as exc:
        raise ValueError(f"manifest {source} is not a readable Parquet/CSV file ({exc}); write "
                         "it as CSV or Parquet with a `uri` column") from exc
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {source} has no `uri` column; its columns: "
                         f"{table.column_names}; name the column of image URIs `uri`")
    n = table.num_rows
    try:
        columns = [
            table["uri"].cast(pa.string()),
            table["size_bytes"].cast(pa.int64()) if "size_bytes" in table.column_names
            else pa.nulls(n, pa.int64()),
            table["etag"].cast(pa.string()) if "etag" in table.column_names
            else pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
            table["product"].cast(pa.string()) if "product" in table.column_names
            else pa.nulls(n, pa.string()),
        ]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"manifest {source}: a column has the wrong type ({exc}); uri, etag "
                         "and product are strings, size_bytes an integer") from exc
    table = pa.Table.from_arrays(columns, schema=INPUT_SCHEMA)
    if table["uri"].null_count:
        raise ValueError(f"manifest {source} has {table['uri'].null_count} empty `uri` values; "
                         "remove those rows")
    duplicates = n - len(pc.unique(table["uri"]))
    if duplicates:
        raise ValueError(f"manifest {source} lists {duplicates} URIs more than once; dedupe it")
    return table


# -- S3 Inventory ----------------------------------------------------------------------------


def _read_inventory(inventory: str, source: str, prefixes: list[str], extensions: list[str]) -> pa.Table:
    """The objects under `prefixes` listed by an S3 Inventory report, as INPUT_SCHEMA."""
    what = f"inventory {inventory}"
    if not storage.is_s3(source):
        raise ValueError(f"{what} lists an S3 bucket, but --input {source} is not an s3:// "
                         "prefix; pass --input s3://bucket/prefix")
    try:
        meta = json.loads(storage.read_bytes(inventory))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not JSON ({exc}); pass the manifest.json of an S3 "
                         "Inventory report") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), list):
        raise ValueError(f"{what} has no `files` list; pass the manifest.json of an S3 "
                         "Inventory report (not a data file or manifest.checksum)")
    fmt = str(meta.get("fileFormat", "")).upper()
    if fmt == "ORC":
        raise ValueError(f"{what} is an ORC report, which is not supported; set the inventory "
                         "configuration's output format to CSV or Parquet")
    if fmt not in ("CSV", "PARQUET"):
        raise ValueError(f"{what} has fileFormat {meta.get('fileFormat')!r}; expected CSV or "
                         "Parquet")
    bucket = source[len("s3://"):].split("/", 1)[0]
    if meta.get("sourceBucket") and meta["sourceBucket"] != bucket:
        raise ValueError(f"{what} lists bucket {meta['sourceBucket']!r}, but --input {source} "
                         f"is in bucket {bucket!r}; pass that bucket's inventory")
    names: list[str] | None = None
    if fmt == "CSV":
        names = [f.strip() for f in str(meta.get("fileSchema", "")).split(",") if f.strip()]
        missing = [f for f in ("Bucket", "Key") if f not in names]
        if missing:
            raise ValueError(f"{what}: its fileSchema {meta.get('fileSchema')!r} lacks "
                             f"{missing}; a CSV report needs Bucket and Key (and Size, ETag)")

    keys = [_key_prefix(p) for p in prefixes]
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    root = None
    batches: list[pa.RecordBatch] = []
    for entry in meta["files"]:
        if not isinstance(entry, dict) or not entry.get("key"):
            raise ValueError(f"{what}: an entry of `files` has no key: {entry!r}")
        root = root or _inventory_root(inventory, meta, entry["key"])
        data_uri = storage.join(root, entry["key"])
        data = storage.read_bytes(data_uri)
        md5 = entry.get("MD5checksum")
        if md5 and hashlib.md5(data).hexdigest() != md5:
            raise ValueError(f"inventory data file {data_uri} does not match its MD5checksum in "
                             f"{inventory}; it is truncated or was replaced: read a complete "
                             "report")
        try:
            for batch in (_csv_batches(data, names) if fmt == "CSV" else _parquet_batches(data)):
                batch = _filter_inventory(batch, bucket, keys, suffixes, data_uri)
                if batch.num_rows:
                    batches.append(batch)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"inventory data file {data_uri} is not a readable {fmt} file "
                             f"({exc}); check the report, or regenerate it") from exc
    table = pa.Table.from_batches(batches, schema=INPUT_SCHEMA)
    table = table.sort_by("uri")  # S3 listing order; report files come in no order
    duplicates = table.num_rows - len(pc.unique(table["uri"]))
    if duplicates:
        raise ValueError(f"{what} lists {duplicates} keys more than once (a report of all "
                         "versions without IsLatest?); include IsLatest or report current "
                         "versions only")
    return table


def _key_prefix(uri: str) -> str:
    """The key prefix (with a trailing '/', or '' for the whole bucket) of an s3:// folder."""
    path = uri[len("s3://"):].strip("/")
    _, _, prefix = path.partition("/")
    return prefix + "/" if prefix else ""


def _inventory_root(inventory: str, meta: dict, key: str) -> str:
    """Where the report's file keys start: its destination bucket (for an S3 manifest, the bucket
    it is in), or for a copied report the ancestor folder of the manifest that holds them."""
    candidates: list[str] = []
    if storage.is_s3(inventory):
        candidates.append("s3://" + inventory[len("s3://"):].split("/", 1)[0])
    parent = inventory.rstrip("/")
    while True:
        head, sep, _ = parent.rpartition("/")
        if not sep or not head or head.endswith(":/"):
            break
        candidates.append(head)
        parent = head
    dest = str(meta.get("destinationBucket") or "").rsplit(":", 1)[-1]
    if dest:
        candidates.append(f"s3://{dest}")
    for root in dict.fromkeys(candidates):
        try:
            if storage.exists(storage.join(root, key)):
                return root
        except storage.StorageError:
            continue  # e.g. a copied report's destination bucket, not reachable from here
    raise ValueError(f"inventory data file {key} of {inventory} not found in its destination "
                     f"bucket {dest or '?'} nor in a folder above the manifest; keep the report "
                     "where S3 wrote it (or copy its whole folder tree)")


def _csv_batches(data: bytes, names: list[str]):
    wanted = [n for n in names if n in _INVENTORY_FIELDS]
    types = {"Bucket": pa.string(), "Key": pa.string(), "Size": pa.int64(), "ETag": pa.string(),
             "IsLatest": pa.bool_(), "IsDeleteMarker": pa.bool_()}
    compression = "gzip" if data[:2] == b"\x1f\x8b" else None
    reader = pacsv.open_csv(
        pa.input_stream(pa.py_buffer(data), compression=compression),
        read_options=pacsv.ReadOptions(column_names=names, block_size=16 << 20),
        convert_options=pacsv.ConvertOptions(
            include_columns=wanted, column_types={n: types[n] for n in wanted},
            true_values=["true", "TRUE", "True"], false_values=["false", "FALSE", "False"]),
    )
    for batch in reader:
        columns = {_INVENTORY_FIELDS[n]: batch.column(n) for n in wanted}
        columns["key"] = url_decode(columns["key"])  # CSV reports URL-encode keys
        yield pa.RecordBatch.from_pydict(columns)


def _parquet_batches(data: bytes):
    import pyarrow.parquet as pq

    f = pq.ParquetFile(pa.py_buffer(data))
    have = set(f.schema_arrow.names)
    yield from f.iter_batches(batch_size=1 << 20,
                              columns=[c for c in _INVENTORY_FIELDS.values() if c in have])


def _filter_inventory(batch: pa.RecordBatch, bucket: str, keys: list[str],
                      suffixes: tuple[str, ...], data_uri: str) -> pa.RecordBatch:
    names = batch.schema.names
    for need in ("bucket", "key"):
        if need not in names:
            raise ValueError(f"inventory data file {data_uri} has no `{need}` column (its "
                             f"columns: {names}); is it an S3 Inventory report?")
    key = batch.column("key").cast(pa.string())
    mask = pc.equal(batch.column("bucket").cast(pa.string()), bucket)
    if any(keys):
        under = pc.starts_with(key, keys[0])
        for k in keys[1:]:
            under = pc.or_(under, pc.starts_with(key, k))
        mask = pc.and_(mask, under)
    mask = pc.and_(mask, pc.invert(pc.ends_with(key, "/")))
    if suffixes:
        lower = pc.utf8_lower(key)
        ext = pc.ends_with(lower, suffixes[0])
        for s in suffixes[1:]:
            ext = pc.or_(ext, pc.ends_with(lower, s))
        mask = pc.and_(mask, ext)
    if "is_delete_marker" in names:
        mask = pc.and_(mask, pc.invert(pc.fill_null(batch.column("is_delete_marker"), False)))
    if "is_latest" in names:
        mask = pc.and_(mask, pc.fill_null(batch.column("is_latest"), True))
    mask = pc.fill_null(mask, False)
    key = key.filter(mask)
    n = len(key)
    uri = pc.binary_join_element_wise(f"s3://{bucket}/", key, "")
    size = (batch.column("size").filter(mask).cast(pa.int64()) if "size" in names
            else pa.nulls(n, pa.int64()))
    etag = (pc.utf8_trim(batch.column("e_tag").filter(mask).cast(pa.string()), '"')
            if "e_tag" in names else pa.nulls(n, pa.string()))
    return pa.RecordBatch.from_arrays([uri, size, etag, pa.nulls(n, pa.string()),
                                       pa.nulls(n, pa.string())], schema=INPUT_SCHEMA)


_HEX = np.full(256, -1, np.int16)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def url_decode(arr: pa.Array) -> pa.Array:
    """Decode form-URL-encoded strings ('+' is a space, %XX a byte) in Arrow buffers with numpy,
    as S3 Inventory CSV keys are written. A '%' not followed by two hex digits stays as it is."""
    arr = arr.cast(pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pc.any(pc.match_substring_regex(arr, r"[%+]")).as_py():
        return arr
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
    base, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(arr.buffers()[2], np.uint8)[base:end].copy() if end > base \
        else np.zeros(0, np.uint8)
    offsets -= base
    data[data == ord("+")] = ord(" ")
    pct = np.flatnonzero(data == ord("%"))
    if len(pct):
        row_end = offsets[np.searchsorted(offsets, pct, side="right")]
        pct = pct[pct + 2 < row_end]
        hi, lo = _HEX[data[pct + 1]], _HEX[data[pct + 2]]
        ok = (hi >= 0) & (lo >= 0)
        pct, hi, lo = pct[ok], hi[ok], lo[ok]
        data[pct] = (hi * 16 + lo).astype(np.uint8)
        keep = np.ones(len(data), bool)
        keep[pct + 1] = False
        keep[pct + 2] = False
        removed = np.concatenate([[0], np.cumsum(~keep)])
        offsets = offsets - removed[offsets]
        data = data[keep]
    out = pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])
    if arr.null_count:
        out = pc.if_else(arr.is_null(), pa.scalar(None, pa.binary()), out)
    try:
        return out.cast(pa.string())
    except pa.ArrowInvalid as exc:
        raise ValueError(f"an URL-encoded key does not decode to UTF-8 ({exc})") from exc
