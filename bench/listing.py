"""Building the scoring input list at scale: anomaly_core.scoring.inputs.list_inputs (listing
pages straight into Arrow) on each kind of input. Prints a table and writes JSON.

  s3 listing     --listing-keys objects in one bucket of a moto S3 server on loopback, listed
                 through storage.list_objects (boto3, pages of 1000).
  manifest       a --keys-row manifest of URIs, as Parquet and as CSV.
  inventory      a --keys-row S3 Inventory report (gzip CSV with URL-encoded keys, and Parquet).

How the keys get into S3: uploading a million objects over HTTP would take far longer than
listing them, so the moto server runs in this process (ThreadedMotoServer shares moto's global
backends) and the keys are put straight into its backend: moto.s3.models.FakeKey(name, b"x",
...) stored in s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_bucket(name).keys[name]. That upload
is not timed; only the listing is.

Stock moto answers every ListObjectsV2 page by walking and sorting the whole bucket (O(N) per
page, O(N^2) per listing: about 0.5 s a page at 100k keys), which would measure moto rather than
the client. By default the bench therefore replaces the backend's list_objects_v2 (in this
process) with one that bisects a sorted index of the key names: same XML, same pagination
tokens, O(page) per page, as real S3. --stock-moto keeps moto as it is (use it at <= 100k).
Even indexed, moto takes ~0.3-0.5 s to write one 1000-key page (2-3k keys/s on 2 cores), so a
1M-key listing takes 6-8 minutes and the S3 rows mostly time moto; hence
--listing-keys (e.g. 100000) apart from --keys (the manifests and reports, cheap at 1M).

Each measurement runs in a fresh Python process (the server stays in this one), so its wall
time and peak RSS (VmHWM) are its own; "base MB" is that process's RSS after its imports,
before the listing, and "delta MB" = peak - base.

    python -m bench.listing [--keys 1000000] [--listing-keys 100000] [--repeat 2] [--stock-moto]
    python -m bench.listing --smoke   # CI: 500 keys, does it run
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
import urllib.parse

from bench.common import last_json, print_table, proc_status_bytes, run_fresh, write_json

BUCKET = f"bench-listing-{os.getpid()}"
PREFIX = "images/"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1"}


def key_name(i: int) -> str:
    """Keys like images/2024-05-01/cam07/000123456.png; a few with spaces and non-ASCII."""
    day, cam = i // 50_000, (i // 1000) % 50
    name = f"{i:09d} é.png" if i % 97 == 0 else f"{i:09d}.png"
    return f"{PREFIX}2024-{1 + day // 28:02d}-{1 + day % 28:02d}/cam{cam:02d}/{name}"


# -- the server side (this process) ----------------------------------------------------------


def start_server():
    import logging

    from moto.server import ThreadedMotoServer

    for key, value in FAKE_AWS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def fill_bucket(endpoint: str, n: int, fast_listing: bool) -> float:
    """Create the bucket over HTTP, put n one-byte keys straight into moto's backend; returns
    the seconds it took (not part of any timing)."""
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import FakeKey, s3_backends

    t0 = time.perf_counter()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    bucket = backend.get_bucket(BUCKET)
    for i in range(n):
        name = key_name(i)
        bucket.keys[name] = FakeKey(name, b"x", DEFAULT_ACCOUNT_ID, "us-east-1",
                                    bucket_name=BUCKET)
    if fast_listing:
        index_listing(backend)
    return time.perf_counter() - t0


def index_listing(backend) -> None:
    """Replace backend.list_objects_v2 (this instance only, for the bench's bucket only) by a
    bisect over its sorted key names; unpatch with `del backend.list_objects_v2`."""
    stock = backend.list_objects_v2
    names = sorted(backend.get_bucket(BUCKET).keys.keys())

    def list_objects_v2(bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        if delimiter or bucket.name != BUCKET:
            return stock(bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        prefix = prefix or ""
        lo = bisect.bisect_left(names, prefix)
        after = (backend._pagination_tokens.get(continuation_token) if continuation_token
                 else start_after)
        if after:
            lo = max(lo, bisect.bisect_right(names, after))
        hi = lo
        while hi < len(names) and hi - lo < max_keys and names[hi].startswith(prefix):
            hi += 1
        keys = [bucket.keys[name] for name in names[lo:hi]]
        truncated = hi < len(names) and names[hi].startswith(prefix)
        token = None
        if truncated:
            token = hashlib.md5(names[hi - 1].encode()).hexdigest()
            backend._pagination_tokens[token] = names[hi - 1]
        return keys, truncated, token

    backend.list_objects_v2 = list_objects_v2


def write_manifests(folder: str, n: int) -> dict[str, str]:
    """A manifest of n URIs as Parquet and CSV, and an S3 Inventory report of n keys (gzip CSV
    with URL-encoded keys, and Parquet) in the AWS layout; returns their paths."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    keys = [key_name(i) for i in range(n)]
    uris = pa.array([f"s3://{BUCKET}/{k}" for k in keys])
    sizes = pa.array([1000 + i % 5000 for i in range(n)], pa.int64())
    table = pa.table({"uri": uris, "size_bytes": sizes})
    out = {"manifest_parquet": os.path.join(folder, "uris.parquet"),
           "manifest_csv": os.path.join(folder, "uris.csv")}
    pq.write_table(table, out["manifest_parquet"])
    pacsv.write_csv(table, out["manifest_csv"])
    inventory = pa.table({"bucket": [BUCKET] * n, "key": keys, "size": sizes,
                          "e_tag": ["9dd4e461268c8034f5c8564e155c67a6"] * n,
                          "is_latest": [True] * n, "is_delete_marker": [False] * n})
    for fmt in ("CSV", "Parquet"):
        config = f"inv/{BUCKET}/{fmt.lower()}"
        name = f"{config}/data/0.{'csv.gz' if fmt == 'CSV' else 'parquet'}"
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if fmt == "CSV":
            encoded = inventory.set_column(
                1, "key", pa.array([urllib.parse.quote_plus(k, safe="/") for k in keys]))
            sink = pa.BufferOutputStream()
            pacsv.write_csv(encoded, sink, pacsv.WriteOptions(
                include_header=False, quoting_style="all_valid"))
            with open(path, "wb") as f:
                f.write(gzip.compress(sink.getvalue().to_pybytes(), compresslevel=1))
        else:
            pq.write_table(inventory, path)
        with open(path, "rb") as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        manifest = {"sourceBucket": BUCKET, "destinationBucket": "arn:aws:s3:::inventory",
                    "fileFormat": fmt, "fileSchema": "Bucket, Key, Size, ETag, IsLatest, "
                    "IsDeleteMarker", "files": [{"key": name, "MD5checksum": md5}]}
        mpath = os.path.join(folder, config, "2024-05-01T01-00Z", "manifest.json")
        os.makedirs(os.path.dirname(mpath), exist_ok=True)
        with open(mpath, "w") as f:
            json.dump(manifest, f)
        out[f"inventory_{fmt.lower()}"] = mpath
    return out


def measure(what: str, path: str, endpoint: str, in_process: bool) -> dict:
    """One list_inputs call in a fresh process (or in this one: --smoke, no memory figures)."""
    if in_process:
        row = child(what, path, endpoint)
        return {**row, "base_mb": None, "peak_mb": None, "delta_mb": None}
    done = run_fresh("bench.listing", "--child", what, path, endpoint, BUCKET,
                     env={**FAKE_AWS, **os.environ})
    if done.returncode != 0:
        return {"input": what, "error": done.stderr.strip().splitlines()[-1:]}
    return last_json(done.stdout)


# -- the client side (a fresh process) -------------------------------------------------------


def child(what: str, path: str, endpoint: str) -> dict:
    from anomaly_core import storage
    from anomaly_core.scoring.inputs import list_inputs

    def rss_mb() -> float:
        # VmHWM: this process image's peak RSS. ru_maxrss would carry over the peak of the
        # forked server process (Linux keeps it across exec).
        peak = proc_status_bytes("VmHWM")
        if peak is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak / 2**20

    base = rss_mb()
    storage.use_endpoint(endpoint)  # this bench's own S3 server, whatever the environment names
    kwargs: dict = {"extensions": [".png"]}
    source = path
    if what.startswith("manifest"):
        kwargs["manifest"] = True
    elif what.startswith("inventory"):
        kwargs["inventory"], source = path, f"s3://{BUCKET}/{PREFIX}"
    t0 = time.perf_counter()
    table = list_inputs(source, **kwargs)
    wall = time.perf_counter() - t0
    peak = rss_mb()
    return {"input": what, "rows": table.num_rows, "wall_s": wall,
            "keys_per_s": table.num_rows / wall, "base_mb": base, "peak_mb": peak,
            "delta_mb": peak - base, "table_mb": table.nbytes / 2**20}


def main(argv: list[str] | None = None) -> dict:
    global BUCKET
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000, help="rows of the manifests/reports")
    p.add_argument("--listing-keys", type=int, default=None,
                   help="objects in the S3 bucket to list (default: --keys)")
    p.add_argument("--stock-moto", action="store_true",
                   help="moto's own O(N)-per-page listing (default: an indexed one, see above)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each input N times in turn; keep the fastest")
    p.add_argument("--smoke", action="store_true",
                   help="500 keys, measured in this process (CI: does it run)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "listing.json"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        BUCKET = args.child.pop()
        print(json.dumps(child(*args.child)))
        return {}
    if args.smoke:
        args.keys = args.listing_keys = 500
    listing_keys = args.listing_keys or args.keys
    t_start = time.perf_counter()
    server, endpoint = start_server()
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    try:
        upload_s = fill_bucket(endpoint, listing_keys, fast_listing=not args.stock_moto)
        work = tempfile.mkdtemp(prefix="bench-listing-")
        files = write_manifests(work, args.keys)
        jobs = [("s3_listing", f"s3://{BUCKET}/{PREFIX}")]
        jobs += [(what, files[what]) for what in
                 ("manifest_parquet", "manifest_csv", "inventory_csv", "inventory_parquet")]
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            for what, path in jobs:
                runs.setdefault(what, []).append(measure(what, path, endpoint, args.smoke))
        rows = []
        for tries in runs.values():
            best = min(tries, key=lambda r: r.get("wall_s", float("inf")))
            rows.append({**best, "tries_s": [round(r["wall_s"], 2) for r in tries
                                             if "wall_s" in r]})
    finally:
        backend.__dict__.pop("list_objects_v2", None)
        backend.buckets.pop(BUCKET, None)
        server.stop()
    print(f"\nS3 listing of {listing_keys:,} keys (moto listing: "
          f"{'stock' if args.stock_moto else 'indexed'}; keys put into moto in {upload_s:.1f} s, "
          f"not timed); manifests and inventory reports of {args.keys:,} rows\n")
    print_table(rows, [("input", "input"), ("rows", "rows"),
                       ("wall_s", "wall s"), ("tries_s", "each try s"), ("keys_per_s", "keys/s"), ("base_mb", "base MB"),
                       ("peak_mb", "peak MB"), ("delta_mb", "delta MB"),
                       ("table_mb", "table MB"), ("error", "error")])
    result = {"keys": args.keys, "listing_keys": listing_keys,
              "moto_listing": "stock" if args.stock_moto else "indexed", "upload_s": upload_s,
              "rows": rows, "bench_wall_s": time.perf_counter() - t_start,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    print(f"\nwhole bench: {result['bench_wall_s']:.1f} s")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
