"""Each product's registered models: list them, show one's history, promote, roll back.

    python -m jobs.models list
    python -m jobs.models show washer
    python -m jobs.models promote washer [--version 3] [--alias champion]
    python -m jobs.models rollback washer

The registry is MLflow's (MLFLOW_TRACKING_URI; unset, the embedded store in ./mlruns). No Ray:
it only reads and moves aliases; the score job resolves models:/<product>@champion when it starts.
"""

from __future__ import annotations

import argparse
import json

from anomaly_core.model import registry
from jobs.common import run_job, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.models", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every product: its champion, candidate and latest version")
    show = sub.add_parser("show", help="a product's versions and alias moves")
    show.add_argument("product")
    promote = sub.add_parser("promote", help="point an alias (champion) at a version")
    promote.add_argument("product")
    promote.add_argument("--version", type=int, help="default: the product's candidate")
    promote.add_argument("--alias", default=registry.CHAMPION)
    rollback = sub.add_parser("rollback", help="point an alias back at its previous version")
    rollback.add_argument("product")
    rollback.add_argument("--alias", default=registry.CHAMPION)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str("" if r.get(c) is None else r[c]) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _alias(versions: list[registry.RegisteredVersion], alias: str) -> int | None:
    return next((v.version for v in versions if alias in v.aliases), None)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    out: dict
    if args.command == "list":
        rows = []
        for product in registry.products():
            found = registry.versions(product)
            rows.append({"product": product, "champion": _alias(found, registry.CHAMPION),
                         "candidate": _alias(found, registry.CANDIDATE),
                         "latest": found[0].version if found else None,
                         "detector": found[0].tags.get("detector") if found else None,
                         "versions": len(found)})
        out, text = {"products": rows}, _table(rows, ["product", "champion", "candidate",
                                                     "latest", "detector", "versions"])
    elif args.command == "show":
        found = registry.versions(args.product)
        if not found:
            raise ValueError(f"no product {args.product!r} in the registry at "
                             f"{registry.shown_uri()}; registered: {registry.products()}")
        rows = [{"version": v.version, "aliases": ",".join(v.aliases),
                 "detector": v.tags.get("detector"),
                 "image_auroc": v.tags.get("val_image_auroc"),
                 "pixel_auroc": v.tags.get("val_pixel_auroc"), "created": v.created_at,
                 "by": v.tags.get("trained_by"), "source": v.source} for v in found]
        moves = registry.history(args.product)
        out = {"product": args.product, "versions": rows, "alias_moves": moves}
        text = (f"{args.product} ({registry.shown_uri()})\n"
                + _table(rows, ["version", "aliases", "detector", "image_auroc",
                                "pixel_auroc", "created", "by", "source"])
                + "\n\nalias moves, newest first\n"
                + _table(moves, ["at", "alias", "from", "to", "by"]))
    else:
        move = registry.promote if args.command == "promote" else registry.rollback
        kwargs = {"version": args.version} if args.command == "promote" else {}
        old, new = move(args.product, alias=args.alias, **kwargs)
        out = {"product": args.product, "alias": args.alias, "from": old, "to": new}
        text = f"{args.product}@{args.alias}: version {old} -> {new}"
    print(json.dumps(out, indent=2, default=str) if args.json else text)
    return out


if __name__ == "__main__":
    run_job(main)
