"""GPU check: fit and score every detector at its default settings through the real jobs
(`python -m jobs.train --use-gpu`, `python -m jobs.score --use-gpu`) and print peak GPU memory,
fit time and scoring images/s per detector. Writes the table as JSON too.

    python -m bench.gpu_check [--detectors padim,stpm] [--out gpu_check.json]
    python -m bench.gpu_check --cpu --set image_size=64 --train 8 --test 4   # dry run, no GPU

ImageNet weights are used where they resolve on this machine, random weights otherwise (speed
and memory do not depend on the weights' values); the table says which. Each job runs in its own
process with a timeout, so one failing detector does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

from bench.common import DETECTORS, REPO, module_command, set_env


class GpuMemoryPeak:
    """Peak of the GPU's used memory (all processes: Ray workers and actors), via nvidia-smi."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak_mb, self.base_mb = every, 0.0, self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return max(float(v) for v in out.split())
        except Exception:
            return float("nan")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._used())
            self._stop.wait(self.every)

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def weights_option(name: str) -> tuple[str, list[str]]:
    """(what the fit uses, extra flags): --set weights=random where the detector's pretrained
    weights do not resolve here."""
    from anomaly_core.detectors import detector_class, make_config
    from anomaly_core.errors import WeightsUnavailableError
    from anomaly_core.features.backbones import check_weights

    needed = detector_class(name).pretrained_weights(make_config(name))
    for backbone, weights in needed:
        try:
            check_weights(backbone, weights)
        except WeightsUnavailableError:
            return "random", ["--set", "weights=random"]
    return ("imagenet" if needed else "none"), []


def run_job(argv: list[str], timeout: float, log_path: str) -> tuple[int, float]:
    """Run `python -m jobs.X ...`; (exit code, wall seconds); output to log_path."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(module_command(*argv), cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def last_line(path: str) -> str:
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][-300:] if lines else ""


def check(name: str, args: argparse.Namespace, data: str, work: str) -> dict:
    """Fit and score one detector; its row of the table."""
    gpu = [] if args.cpu else ["--use-gpu"]
    sets = [x for kv in args.set for x in ("--set", kv)]
    used, weights = weights_option(name)
    model, scores = os.path.join(work, f"{name}-model"), os.path.join(work, f"{name}-scores")
    row = {"detector": name, "weights": used, "options": args.set}
    with GpuMemoryPeak() as fit_mem:
        code, fit_s = run_job(["jobs.train", "--data", data, "--category", "capsule", "--detector", name,
                               "--output", model, "--epochs", str(args.epochs), "--batch-size",
                               str(args.batch_size), "--num-workers", str(args.workers), *gpu,
                               *weights, *sets], args.timeout, f"{model}.log")
    row.update(fit_exit=code, fit_s=round(fit_s, 1), fit_peak_gpu_mb=fit_mem.peak_mb - fit_mem.base_mb)
    if code != 0:
        row["error"] = "fit: " + last_line(f"{model}.log")
        return row
    with GpuMemoryPeak() as score_mem:
        code, score_s = run_job(["jobs.score", "--model", model, "--input",
                                 os.path.join(data, "capsule", "test"), "--output", scores,
                                 "--batch-size", str(args.batch_size), "--progress-every", "0",
                                 *gpu], args.timeout, f"{scores}.log")
    row.update(score_exit=code, score_s=round(score_s, 1),
               score_peak_gpu_mb=score_mem.peak_mb - score_mem.base_mb)
    if code != 0:
        row["error"] = "score: " + last_line(f"{scores}.log")
        return row
    runs = os.path.join(scores, "_runs")
    success = json.load(open(os.path.join(runs, os.listdir(runs)[0], "_SUCCESS.json")))
    row.update(scored=success["scored"], images_per_s=success.get("images_per_s"))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detectors", default=",".join(DETECTORS))
    p.add_argument("--train", type=int, default=64, help="training images (synthetic capsule)")
    p.add_argument("--test", type=int, default=256, help="images to score")
    p.add_argument("--size", type=int, default=256, help="synthetic image size")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (GPUs) per fit")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--set", action="append", default=[], help="extra detector option (dry runs)")
    p.add_argument("--cpu", action="store_true", help="dry run without --use-gpu")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = p.parse_args()
    set_env()
    from anomaly_core.data.synthetic import generate

    work = tempfile.mkdtemp(prefix="gpu-check-")
    data = os.path.join(work, "data")
    generate(data, categories=["capsule"], size=args.size, n_train=args.train,
             n_test_good=args.test // 2, n_test_defect=args.test - args.test // 2)
    rows = []
    for name in args.detectors.split(","):
        row = check(name, args, data, work)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:  # after each detector: a timeout keeps what was measured
            json.dump({"device": "cpu (dry run)" if args.cpu else gpu_name(),
                       "rows": rows}, f, indent=2)
    print(f"\n{'detector':<12}{'weights':>9}{'fit s':>8}{'fit GPU MB':>12}{'score s':>9}"
          f"{'score GPU MB':>14}{'images/s':>10}  error")
    for r in rows:
        print(f"{r['detector']:<12}{r['weights']:>9}{r['fit_s']:>8}{r['fit_peak_gpu_mb']:>12.0f}"
              f"{r.get('score_s', '-'):>9}{r.get('score_peak_gpu_mb', float('nan')):>14.0f}"
              f"{r.get('images_per_s') or '-':>10}  {r.get('error', '')}")
    shutil.rmtree(work, ignore_errors=True)


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"

if __name__ == "__main__":
    main()
