"""The Arrow input list (anomaly_core.scoring.inputs): folder listing page by page, manifests, S3
Inventory reports and date-partitioned listing, on local folders and a real S3 protocol server
(moto on loopback)."""

import functools
import gzip
import hashlib
import io
import json
import urllib.parse
from datetime import UTC, date, datetime

import boto3
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from anomaly_core import storage
from anomaly_core.scoring import inputs
from anomaly_core.storage import StorageError

EXT = [".png", "jpg"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> tuple[str, str | None]:
    """(empty root URI, s3 endpoint) for each backend."""
    if request.param == "local":
        return str(tmp_path), None
    return request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_endpoint")


@pytest.fixture
def small_pages(monkeypatch):
    """storage.list_objects in pages of 7, so a few files make several pages (old and new)."""
    monkeypatch.setattr(storage, "list_objects",
                        functools.partial(storage.list_objects, page_size=7))


def _put(base: str, ep: str | None, *keys: str, data: bytes = b"x") -> None:
    for key in keys:
        storage.write_bytes(storage.join(base, key), data)


# -- folder listing --------------------------------------------------------------------------


def test_folder_listing_pages_into_one_table_of_the_wanted_files(root, small_pages):
    base, ep = root
    source = storage.join(base, "in")
    keys = [f"d{d}/{i:02d}.png" for d in range(3) for i in range(9)]
    keys += ["a.JPG", "b.txt", "d1/deeper/e.jpg", "z/notes.md"]
    for i, key in enumerate(keys):
        _put(source, ep, key, data=b"x" * (i + 1))

    new = inputs.list_inputs(source, extensions=EXT)

    assert new.schema == inputs.INPUT_SCHEMA
    wanted = [k for k in keys if k.lower().endswith((".png", ".jpg"))]
    assert new["uri"].to_pylist() == sorted(storage.join(source, k) for k in wanted)
    assert new.num_rows == 29 and new.column("uri").num_chunks > 1  # several pages, as batches
    assert new["prev_etag"].null_count == new.num_rows
    if ep:
        assert new["etag"].null_count == 0
    by_uri = dict(zip(new["uri"].to_pylist(), new["size_bytes"].to_pylist()))
    assert by_uri[storage.join(source, "a.JPG")] == keys.index("a.JPG") + 1


def test_folder_listing_errors_name_the_input(root):
    base, ep = root
    with pytest.raises(StorageError, match="nothing under|is not a folder") as err:
        inputs.list_inputs(storage.join(base, "nowhere"), extensions=EXT)
    assert "nowhere" in str(err.value)


# -- manifest of URIs ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_csv_and_parquet_equal_the_old_reader(root, fmt):
    base, ep = root
    table = pa.table({"uri": [f"s3://b/img/{i}.png" for i in range(5)],
                      "size_bytes": [10, 20, 30, 40, 50], "etag": ["1", "2", "3", "4", "5"],
                      "other": list("abcde")})
    uri = storage.join(base, f"uris.{fmt}")
    if fmt == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        data = sink.getvalue()
    else:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data = sink.getvalue()
    storage.write_bytes(uri, data)

    new = inputs.list_inputs(uri, extensions=EXT, manifest=True)
    assert new.schema == inputs.INPUT_SCHEMA and new["prev_etag"].null_count == new.num_rows
    assert new["uri"].to_pylist() == table["uri"].to_pylist()
    assert new["etag"].to_pylist() == ["1", "2", "3", "4", "5"]  # strings, even from CSV


def test_manifest_errors_say_what_to_do(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("uri\n/a.png\n/b.png\n/a.png\n")
    with pytest.raises(ValueError, match=r"dup.csv lists 1 URIs more than once; dedupe it"):
        inputs.list_inputs(str(dup), extensions=EXT, manifest=True)
    nouri = tmp_path / "paths.csv"
    nouri.write_text("path\n/a.png\n")
    with pytest.raises(ValueError, match=r"paths.csv has no `uri` column.*'path'"):
        inputs.list_inputs(str(nouri), extensions=EXT, manifest=True)
    txt = tmp_path / "uris.txt"
    txt.write_text("/a.png\n")
    with pytest.raises(ValueError, match=r"uris.txt is neither .csv nor .parquet"):
        inputs.list_inputs(str(txt), extensions=EXT, manifest=True)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken.parquet is not a readable Parquet/CSV"):
        inputs.list_inputs(str(broken), extensions=EXT, manifest=True)
    with pytest.raises(ValueError, match="pass one of them"):
        inputs.list_inputs(str(dup), extensions=EXT, manifest=True, inventory="s3://b/m.json")


# -- S3 Inventory ----------------------------------------------------------------------------

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"

# (key, is_latest, is_delete_marker, size); the source prefix is images/
OBJECTS = [
    ("images/a b.png", True, False, 11),
    ("images/ünï cödé/c+d.png", True, False, 12),
    ("images/sub/x.JPG", True, False, 13),
    ("images/100%/p.png", True, False, 14),
    ("images/notes.txt", True, False, 15),        # other extension
    ("images/deleted.png", True, True, None),     # delete marker
    ("images/old.png", False, False, 16),         # an older version ...
    ("images/old.png", True, False, 17),          # ... and the current one
    ("images/folder/", True, False, 0),           # folder marker
    ("imagesX/y.png", True, False, 18),           # another prefix that starts alike
    ("other/o.png", True, False, 19),
]
EXPECTED = sorted(["images/a b.png", "images/ünï cödé/c+d.png", "images/sub/x.JPG",
                   "images/100%/p.png", "images/old.png"])


def _put_raw(uri: str, data: bytes, ep: str | None) -> None:
    """Store bytes exactly as given, as S3 Inventory writes them. (storage.write_bytes lets
    pyarrow gzip an S3 object named *.gz once more, and storage.read_bytes gunzips a local one.)"""
    if storage.is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        boto3.client("s3", endpoint_url=ep, region_name="us-east-1").put_object(
            Bucket=bucket, Key=key, Body=data)
    else:
        storage.write_bytes(uri, data)


def _inventory(dest: str, src_bucket: str, fmt: str, ep: str | None, *, md5: bool = True) -> str:
    """Write an S3 Inventory report of OBJECTS in the AWS layout under `dest`, in two data files;
    returns its manifest.json URI."""
    config = f"inv/{src_bucket}/daily"
    rows = [dict(bucket=src_bucket, key=k, version_id=f"v{i}", is_latest=latest,
                 is_delete_marker=marker, size=size, last_modified_date="2024-05-01T00:00:00.000Z",
                 e_tag=None if marker else f"etag{i}") for i, (k, latest, marker, size)
            in enumerate(OBJECTS)]
    files = []
    for part, chunk in enumerate([rows[:5], rows[5:]]):
        if fmt == "CSV":
            lines = []
            for r in chunk:
                values = [r["bucket"], urllib.parse.quote_plus(r["key"], safe="/"), r["version_id"],
                          str(r["is_latest"]).lower(), str(r["is_delete_marker"]).lower(),
                          "" if r["size"] is None else str(r["size"]), r["last_modified_date"],
                          r["e_tag"] or ""]
                lines.append(",".join(f'"{v}"' for v in values))
            data = gzip.compress(("\n".join(lines) + "\n").encode())
            name = f"{config}/data/part-{part}.csv.gz"
        else:
            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(chunk), sink)
            data = sink.getvalue()
            name = f"{config}/data/part-{part}.parquet"
        _put_raw(storage.join(dest, name), data, ep)
        files.append({"key": name, "size": len(data),
                      "MD5checksum": hashlib.md5(data).hexdigest() if md5 else "0" * 32})
    manifest = {
        "sourceBucket": src_bucket,
        "destinationBucket": f"arn:aws:s3:::{dest.removeprefix('s3://')}",
        "version": "2016-11-30",
        "creationTimestamp": "1714525200000",
        "fileFormat": fmt,
        "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { ... }",
        "files": files,
    }
    uri = storage.join(dest, config, "2024-05-01T01-00Z", "manifest.json")
    storage.write_bytes(uri, json.dumps(manifest).encode())
    return uri


@pytest.fixture
def two_buckets(s3_endpoint, s3_bucket):
    """(source bucket, inventory destination bucket, endpoint) on moto."""
    dest = f"{s3_bucket}-inv"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=dest.removeprefix("s3://"))
    return s3_bucket, dest, s3_endpoint


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_is_filtered_by_prefix_extension_and_latest(two_buckets, fmt):
    src, dest, ep = two_buckets
    name = src.removeprefix("s3://")
    manifest = _inventory(dest, name, fmt, ep)

    table = inputs.list_inputs(f"{src}/images/", extensions=EXT, inventory=manifest)

    assert table.schema == inputs.INPUT_SCHEMA
    assert table["uri"].to_pylist() == [f"{src}/{k}" for k in EXPECTED]
    got = {u.removeprefix(f"{src}/"): (s, e) for u, s, e in
           zip(*(table[c].to_pylist() for c in ("uri", "size_bytes", "etag")))}
    assert got["images/old.png"] == (17, "etag7")  # the current version, not the old one
    assert got["images/a b.png"] == (11, "etag0")
    # the whole bucket: other prefixes come in too, still without the delete marker
    whole = inputs.list_inputs(src, extensions=EXT, inventory=manifest)
    assert {f"{src}/imagesX/y.png", f"{src}/other/o.png"} <= set(whole["uri"].to_pylist())
    assert f"{src}/images/deleted.png" not in whole["uri"].to_pylist()


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_a_copied_inventory_is_found_above_its_manifest(tmp_path, fmt):
    manifest = _inventory(str(tmp_path / "copy"), "plant", fmt, None)
    table = inputs.list_inputs("s3://plant/images", extensions=EXT, inventory=manifest)
    assert table["uri"].to_pylist() == [f"s3://plant/{k}" for k in EXPECTED]


def test_inventory_with_since_keeps_only_the_day_folders(tmp_path):
    dest = str(tmp_path / "copy")
    config = "inv/plant/daily"
    keys = ["in/2024/04/29/a.png", "in/2024/04/30/b.png", "in/2024/05/01/c.png", "in/x.png"]
    sink = io.BytesIO()
    pq.write_table(pa.table({"bucket": ["plant"] * 4, "key": keys, "size": [1, 2, 3, 4],
                             "e_tag": ["a", "b", "c", "d"]}), sink)
    storage.write_bytes(storage.join(dest, config, "data", "f.parquet"), sink.getvalue())
    manifest = storage.join(dest, config, "2024-05-01T01-00Z", "manifest.json")
    storage.write_bytes(manifest, json.dumps(
        {"sourceBucket": "plant", "fileFormat": "Parquet",
         "files": [{"key": f"{config}/data/f.parquet"}]}).encode())
    table = inputs.list_inputs("s3://plant/in/", extensions=EXT, inventory=manifest,
                               since="2024-04-30", date_prefix="%Y/%m/%d/", today="2024-05-01")
    assert table["uri"].to_pylist() == ["s3://plant/in/2024/04/30/b.png",
                                        "s3://plant/in/2024/05/01/c.png"]


def test_inventory_errors_say_what_to_do(two_buckets, tmp_path):
    src, dest, ep = two_buckets
    name = src.removeprefix("s3://")
    manifest = _inventory(dest, name, "CSV", ep)

    def fails(match, *, source=f"{src}/images", inventory=manifest, endpoint=ep):
        with pytest.raises((ValueError, StorageError), match=match):
            inputs.list_inputs(source, extensions=EXT, inventory=inventory)

    fails(r"is not an s3:// prefix", source=str(tmp_path))
    fails(r"lists bucket .* but --input s3://elsewhere/images is in bucket 'elsewhere'",
          source="s3://elsewhere/images")
    fails(r"manifest.json does not exist", inventory=f"{dest}/nope/manifest.json")

    def variant(label: str, change) -> str:
        meta = json.loads(storage.read_bytes(manifest))
        change(meta)
        uri = f"{dest}/{label}/manifest.json"
        storage.write_bytes(uri, json.dumps(meta).encode())
        return uri

    fails(r"ORC report, which is not supported; .* CSV or Parquet",
          inventory=variant("orc", lambda m: m.update(fileFormat="ORC")))
    fails(r"lacks \['Key'\]",
          inventory=variant("nokey", lambda m: m.update(fileSchema="Bucket, Size")))
    fails(r"does not match its MD5checksum",
          inventory=variant("md5", lambda m: m["files"][0].update(MD5checksum="0" * 32)))
    fails(r"part-9.csv.gz .* not found",
          inventory=variant("gone", lambda m: m["files"][0].update(
              key=m["files"][0]["key"].replace("part-0", "part-9"))))
    fails(r"has no `files` list", inventory=variant("nofiles", lambda m: m.pop("files")))
    storage.write_bytes(f"{dest}/notjson/manifest.json", b"\x1f\x8bgz")
    fails(r"is not JSON", inventory=f"{dest}/notjson/manifest.json")
    parquet_as_csv = variant("badcsv", lambda m: m.update(fileFormat="Parquet"))
    fails(r"part-0.csv.gz is not a readable PARQUET file", inventory=parquet_as_csv)


# -- date-partitioned listing ----------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["%Y/%m/%d/", "dt=%Y-%m-%d/"])
def test_since_lists_only_the_newer_day_folders(root, monkeypatch, pattern):
    base, ep = root
    source = storage.join(base, "incoming")
    for day in ["2024-04-28", "2024-04-29", "2024-04-30", "2024-05-02", "2024-05-03"]:
        folder = datetime.strptime(day, "%Y-%m-%d").strftime(pattern)
        _put(source, ep, f"{folder}cam1/{day}.png", f"{folder}{day}.txt")
    _put(source, ep, "loose.png")  # not in a day folder: never taken with --since
    listed = []
    real = storage.list_objects

    def spy(uri, **kw):
        listed.append(uri)
        return real(uri, **kw)

    monkeypatch.setattr(storage, "list_objects", spy)

    table = inputs.list_inputs(source, extensions=EXT, since=date(2024, 4, 30),
                               date_prefix=pattern, today=date(2024, 5, 3))

    days = ["2024-04-30", "2024-05-02", "2024-05-03"]
    folder = {d: datetime.strptime(d, "%Y-%m-%d").strftime(pattern) for d in
              ["2024-04-29", *days, "2024-05-01"]}
    assert table["uri"].to_pylist() == [storage.join(source, f"{folder[d]}cam1/{d}.png")
                                        for d in days]
    # the days before --since are never listed; the missing 1 May is tried and skipped
    assert listed == [storage.join(source, folder[d]) for d in
                      ["2024-04-30", "2024-05-01", "2024-05-02", "2024-05-03"]]
    assert not any(folder["2024-04-29"].rstrip("/") in u for u in listed)
    assert table.schema == inputs.INPUT_SCHEMA


def test_since_defaults_to_today_utc(root):
    base, ep = root
    today = datetime.now(UTC).date()
    _put(base, ep, f"{today:%Y/%m/%d}/now.png", "2000/01/01/old.png")
    table = inputs.list_inputs(base, extensions=EXT, since=today.isoformat(),
                               date_prefix="%Y/%m/%d")
    assert table["uri"].to_pylist() == [storage.join(base, f"{today:%Y/%m/%d}/now.png")]


def test_since_with_no_day_folder_names_the_prefixes_tried(root):
    base, ep = root
    _put(base, ep, "2024/01/01/old.png", "2024/05/04/later.png")
    with pytest.raises(StorageError, match=r"nothing under .* for the 3 day folder\(s\)") as err:
        inputs.list_inputs(base, extensions=EXT, since="2024-05-01", date_prefix="%Y/%m/%d/",
                           today="2024-05-03")
    assert storage.join(base, "2024/05/01") in str(err.value)
    assert storage.join(base, "2024/05/03") in str(err.value)


def test_since_on_a_missing_bucket_names_the_bucket(s3_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        inputs.list_inputs("s3://no-such-bucket-here/in", extensions=EXT, since="2024-05-01",
                           date_prefix="%Y/%m/%d/", today="2024-05-02")


@pytest.mark.parametrize("kwargs, match", [
    ({"date_prefix": "daily/"}, "has no date in it"),
    ({"date_prefix": "/%Y/%m/%d/"}, "must be relative to --input"),
    ({"date_prefix": "%Y/../%d/"}, "must be relative to --input"),
    ({"date_prefix": "%Y/%Q/"}, "directive strftime does not know"),
    ({"since": "2099-01-01"}, "is after today"),
    ({"since": "yesterday"}, "is not a date; use YYYY-MM-DD"),
    ({"date_prefix": None}, "--since and --date-prefix go together"),
    ({"since": None}, "--since and --date-prefix go together"),
])
def test_bad_date_options_are_rejected_before_any_listing(tmp_path, kwargs, match):
    options = {"since": "2024-05-01", "date_prefix": "%Y/%m/%d/", **kwargs}
    with pytest.raises(ValueError, match=match):
        inputs.list_inputs(str(tmp_path / "nowhere"), extensions=EXT, **options)
    with pytest.raises(ValueError, match="manifest .* already names every image"):
        inputs.list_inputs(str(tmp_path / "m.csv"), extensions=EXT, manifest=True,
                           since="2024-05-01", date_prefix="%Y/%m/%d/")


def test_a_fleet_takes_each_images_product_from_a_hive_key_or_a_folder_level():
    from anomaly_core.scoring.inputs import products_from_paths

    uris = ["s3://b/in/2026-12-01/product=washer/a.png", "s3://b/in/line=7/bolt/b.png",
            "s3://b/in/c.png", "s3://b/in/product=/d.png"]
    table = pa.table({"uri": uris, "size_bytes": [1] * 4, "etag": [None] * 4,
                      "prev_etag": [None] * 4, "product": [None] * 4}).cast(inputs.INPUT_SCHEMA)
    found = products_from_paths(table, "s3://b/in/", "hive:product")["product"].to_pylist()
    assert found == ["washer", None, None, None]  # no key, or an empty value: no product
    assert products_from_paths(table, "s3://b/in", "hive:line")["product"].to_pylist() == \
        [None, "7", None, None]
    assert products_from_paths(table, "s3://b/in", "folder:2")["product"].to_pylist() == \
        ["product=washer", "bolt", None, None]
    for bad in ("hive:", "folder:0", "folder:x", "path"):
        with pytest.raises(ValueError, match="expected hive:KEY .* or folder:N"):
            products_from_paths(table, "s3://b/in", bad)


def test_a_manifest_may_name_each_images_product(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,product\n/a.png,washer\n/b.png,bolt\n")
    table = inputs.list_inputs(str(manifest), extensions=[], manifest=True)
    assert table.schema == inputs.INPUT_SCHEMA
    assert table["product"].to_pylist() == ["washer", "bolt"]
