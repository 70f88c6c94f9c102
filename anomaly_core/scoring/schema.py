"""The one owner of the Parquet score-row schema: columns, types, partitions, file encoding.

Rows live under <output>/dt=YYYY-MM-DD/product=NAME/version=V/: the day scored, the product (the
registered model's name; a bare artifact's detector name) and the model version scored with (the
registered version number; a bare artifact's weights digest; `none` for an image whose product
has no model). As in Hive and Spark, the partition columns are in the directory names, not
inside the files: readers of the directory (pyarrow.dataset, pandas, DuckDB, Spark, Athena) add
them, and a column stored in both places makes pandas and pyarrow refuse the dataset. `version`
is a string: read it as one where artifacts and registered versions share an output.
"""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARTITION_COLUMNS = ("dt", "product", "version")
NO_MODEL = "none"  # the version= of rows whose product has no model (error rows)
# A product's name: a registered model's name and a partition value (no "/", "=" or spaces).
PRODUCT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
FILE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),  # S3 ETag, or "sha256:<hex>" of a local file's bytes
        pa.field("size_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("score_normalized", pa.float64()),
        pa.field("is_anomalous", pa.bool_()),
        pa.field("mask_png", pa.binary()),
        pa.field("heatmap_png", pa.binary()),
        pa.field("error", pa.string()),  # null when scored; the reason when not
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)
# What a reader of the output directory sees.
COLUMNS = (*FILE_SCHEMA.names, *PARTITION_COLUMNS)


def utc_now() -> datetime:
    return datetime.now(UTC)


def score_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts; missing columns are null) as a table with exactly FILE_SCHEMA."""
    unknown = {k for row in rows for k in row} - set(FILE_SCHEMA.names)
    if unknown:
        raise ValueError(f"score rows have columns outside the schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA)


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """One Parquet file's bytes (zstd), with optional key-value metadata."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def partition_path(root: str, day: str, product: str, version: str) -> str:
    """Hive partition directory dt=YYYY-MM-DD/product=NAME/version=V under the output root."""
    from anomaly_core import storage

    return storage.join(root, f"dt={day}", f"product={product}", f"version={version}")
