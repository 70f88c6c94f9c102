"""The one owner of the Parquet score-row schema: columns, types, and how a row is made."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

SCORE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),  # content digest "sha256:<hex>" for files we hashed
        pa.field("size_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("score_normalized", pa.float64()),
        pa.field("is_anomalous", pa.bool_()),
        pa.field("mask_png", pa.binary()),
        pa.field("heatmap_png", pa.binary()),
        pa.field("error", pa.string()),  # null when scored; the reason when not
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
COLUMNS = tuple(SCORE_SCHEMA.names)


def utc_now() -> datetime:
    return datetime.now(UTC)


def score_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts; missing columns are null) as a table with exactly SCORE_SCHEMA."""
    unknown = {k for row in rows for k in row} - set(COLUMNS)
    if unknown:
        raise ValueError(f"score rows have columns outside the schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def partition_path(root: str, model: str, day: datetime) -> str:
    """Hive partition directory dt=YYYY-MM-DD/model=NAME under the output root."""
    from anomaly_core import storage

    return storage.join(root, f"dt={day:%Y-%m-%d}", f"model={model}")
