"""One static HTML page about a scoring run: the most anomalous images with their heatmap and mask,
the score distribution (per day, and against the model's validation scores), metrics against
labels when there are some, and the run's summary. No server, no network: one file to open or send.

    python -m jobs.report --scores DIR_OR_S3 [--labels MVTEC_ROOT] --out report/

Only the light columns of the rows are read for the distributions; PNGs and images are read for
the thumbnails (the top N and a random sample) and, with --labels, for the labelled rows alone.
The page is made by anomaly_core.report.write.write_report.
"""

from __future__ import annotations

import argparse
import time

from jobs.common import log, run_job, setup_logging, use_storage_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="the score job's --output: a folder or s3:// prefix")
    p.add_argument("--out", required=True, help="folder for index.html (a folder or s3:// prefix)")
    p.add_argument("--labels", help="MVTec-layout root whose test images were scored: adds AUROC, "
                   "AUPRO, F1 and accuracy per category and defect type, and the true defect "
                   "contours")
    p.add_argument("--run-id", help="the run to report (default: the last finished one of the "
                   "latest day)")
    p.add_argument("--product", help="the product to report, when the run scored several (a "
                   "--fleet run)")
    p.add_argument("--top", type=int, default=24, help="thumbnails of the most anomalous images")
    p.add_argument("--sample", type=int, default=12, help="thumbnails of a random sample of the rest")
    p.add_argument("--thumb-size", type=int, default=256, help="longest side of a thumbnail, px")
    p.add_argument("--days", type=int, default=30, help="days up to the run's in the per-day section")
    p.add_argument("--plant", action="store_true",
                   help="the plant overview: every product's last run of --day (default: the "
                        "latest night), each with its full report, and a page over --nights")
    p.add_argument("--day", help="YYYY-MM-DD, with --plant")
    p.add_argument("--nights", type=int, default=7, help="nights on the rolling page (--plant)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (sets "
                   "AWS_ENDPOINT_URL_S3; without it the AWS environment decides)")
    args = p.parse_args(argv)
    if args.top < 0 or args.sample < 0:
        p.error(f"--top {args.top} and --sample {args.sample} must be 0 or more")
    if args.days < 1:
        p.error(f"--days {args.days} must be 1 or more")
    if args.thumb_size < 32:
        p.error(f"--thumb-size {args.thumb_size} is too small to see anything; use 32 or more")
    return args


def main(argv: list[str] | None = None) -> str:
    setup_logging()
    args = parse_args(argv)
    use_storage_flags(args)
    from anomaly_core.report.plant import write_overview
    from anomaly_core.report.write import write_report

    t0 = time.perf_counter()
    out = write_overview(args.scores, args.out, day=args.day, nights=args.nights,
                         top=args.top) if args.plant else write_report(args.scores, args.out, labels_root=args.labels, run_id=args.run_id,
                       product=args.product, top=args.top, sample=args.sample, thumb_size=args.thumb_size,
                       days=args.days)
    log.info("report written in %.1f s", time.perf_counter() - t0)
    print(f"report    {out}")
    return out


if __name__ == "__main__":
    run_job(main)
