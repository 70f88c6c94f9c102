"""Tiled scoring speed: tiles/s and images/s of tiled detectors at their defaults on images of a
high-resolution working size, through the Scorer as the score job's actor runs them (uint8
images in, tiles to float a tile batch at a time, maps stitched). Prints a table, writes JSON.

    python -m bench.tiled_throughput [--detectors padim,patchcore] [--size 2048] [--tile 256]
        [--stride 256] [--model-size 256] [--positions shared|own] [--images 2] [--device cpu]

Besides speed: the row stage of one image at its own size (mask and heatmap rendered from the
stitched map, PNG-encoded), and how far resident memory rises (sampled) while scoring and
while rendering, above what the model and the images already hold.
    python -m bench.tiled_throughput --smoke     # small sizes (CI)
"""

from __future__ import annotations

import argparse
import os
import time

from anomaly_core.config import parse_overrides
from bench.common import (
    CALIBRATION,
    bench_artifact,
    cuda_available,
    machine,
    print_table,
    synchronizer,
    write_json,
)


def measure(name: str, args, sets: dict) -> dict:
    import torch

    from anomaly_core.detectors import build_detector
    from anomaly_core.detectors.tiling import TiledDetector, Tiling
    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.scorer import Scorer, encode_png, render_maps
    from anomaly_core.training.fit import fit
    from tests.helpers import TensorImages

    torch.manual_seed(0)
    inner = build_detector(name, **{"weights": "random", "image_size": args.model_size or args.tile,
                                    **sets})
    tiling = Tiling(size=(args.size, args.size), tile=args.tile, stride=args.stride,
                    batch=args.tile_batch, positions=args.positions)
    detector = TiledDetector(inner, tiling)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(args.fit_images, 3, args.size, args.size, generator=g)
    start = time.perf_counter()
    fit(detector, TensorImages(train), batch_size=1, device=args.device)
    fit_s = time.perf_counter() - start
    scorer = Scorer(bench_artifact(detector), device=args.device)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8,
                           generator=g)
    del train
    scorer(images[:1])  # warm-up
    sync = synchronizer(args.device)
    sync()
    with RssPeak() as scoring:
        start = time.perf_counter()
        for i in range(args.images):
            out = scorer(images[i:i + 1])
        sync()
        seconds = time.perf_counter() - start
    tiles = len(tiling.origins) * args.images
    with RssPeak() as rendering:
        start = time.perf_counter()
        masks, heats = render_maps(out.map.cpu(), [(args.size, args.size)],
                                   Calibration(**CALIBRATION))
        png_mib = (len(encode_png(masks[0])) + len(encode_png(heats[0]))) / 2**20
        render_s = time.perf_counter() - start
    return {"detector": name, "size": args.size, "tile": args.tile, "stride": args.stride,
            "positions": args.positions, "tiles_per_image": len(tiling.origins),
            "map": "x".join(map(str, out.map.shape[-2:])), "fit_s": fit_s,
            "tiles_per_s": tiles / seconds, "images_per_s": args.images / seconds,
            "render_s": render_s, "png_mib": png_mib, "score_rss_mib": scoring.grown_mib,
            "render_rss_mib": rendering.grown_mib}


class RssPeak:
    """How far resident memory rose above where it stood at entry, sampled every 10 ms."""

    def __enter__(self) -> RssPeak:
        import threading

        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.grown_mib = (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detectors", default="padim,patchcore")
    p.add_argument("--size", type=int, default=2048, help="working size (square)")
    p.add_argument("--tile", type=int, default=256, help="tile side = the detector's image_size")
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--tile-batch", type=int, default=32)
    p.add_argument("--model-size", type=int, default=None,
                   help="the detector's image_size, tiles are resized to (default: the tile)")
    p.add_argument("--positions", choices=("shared", "own"), default="shared")
    p.add_argument("--images", type=int, default=2, help="images scored (one per call)")
    p.add_argument("--fit-images", type=int, default=2)
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--set", action="append", default=[], help="detector option key=value")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tiled_throughput.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.tile, args.stride, args.images, args.fit_images = 128, 64, 32, 1, 1
        args.set = ["backbone=resnet18", *args.set]
    rows = []
    for name in args.detectors.split(","):
        try:
            rows.append(measure(name, args, parse_overrides(args.set)))
        except Exception as exc:  # one detector failing keeps the others' numbers
            rows.append({"detector": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    print(f"\ntiled scoring on {args.device}, defaults{' + ' + ','.join(args.set) if args.set else ''}"
          ", random weights, uint8 images through the Scorer, one image per call")
    print_table(rows, [("detector", "detector"), ("size", "working px"), ("tile", "tile"),
                       ("stride", "stride"), ("tiles_per_image", "tiles/image"), ("map", "map"),
                       ("fit_s", f"fit s ({args.fit_images} images)"), ("tiles_per_s", "tiles/s"),
                       ("images_per_s", "images/s"), ("render_s", "mask+heatmap s"),
                       ("png_mib", "PNGs MiB"), ("score_rss_mib", "scoring +RSS MiB"),
                       ("render_rss_mib", "render +RSS MiB"),
                       ("error", "error")])
    result = {"machine": machine(), "args": vars(args), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
