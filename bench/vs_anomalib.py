"""Ours against anomalib 2.7's torch models, side by side: PaDiM, PatchCore, FastFlow, STPM.

The same synthetic images (capsule, train on good ones, test on good + defective with masks),
the same backbone weights (ours copied into anomalib's timm backbone; random by default, as speed
and memory do not depend on their values), the same resolution, batch and device. Fit in float32; the forward in float32 and, on a GPU, in
fp16 too (ours through the job's 16-bit path, anomalib under torch.autocast as Lightning's
"16-mixed" runs it). Per model: fit seconds, forward images/s, peak memory (each model runs in its own process: peak
RSS on CPU, torch's peak allocation on a GPU), image and pixel AUROC. anomalib is a bench-only
extra (`pip install anomalib==2.7.0`), never a runtime dependency; its lightning wrappers are not
used, only the torch models with the training steps of their lightning modules (PaDiM Gaussian
fit, PatchCore k-center-greedy coreset at 0.1, FastFlow Adam 1e-3 on its loss, STFPM SGD 0.4).

    python -m bench.vs_anomalib [--detectors padim,patchcore,fastflow,stpm] [--train 64]
        [--test 64] [--size 256] [--batch-size 16] [--epochs 1] [--rounds 10] [--device cuda]
        [--profile]
    python -m bench.vs_anomalib --smoke     # CI: tiny, resnet18, does it run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time

from bench.common import (
    bench_artifact,
    cuda_available,
    load_split,
    machine,
    print_table,
    run_fresh,
    set_env,
    synchronizer,
    write_json,
    write_split,
)

DETECTORS = ("padim", "patchcore", "fastflow", "stpm")
IMPLS = ("ours", "anomalib")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ours(name: str, config: dict):
    from anomaly_core.detectors import build_detector

    return build_detector(name, **config)


def copy_weights(src, dst) -> int:
    """Copy a torchvision/timm backbone's tensors into another by parameter name; returns how
    many; raises when a tensor of `dst` has no counterpart of the same shape."""
    import torch

    theirs = dst.state_dict()
    mine = {k.split("body.", 1)[-1]: v for k, v in src.state_dict().items()}
    missing = [k for k in theirs if k not in mine or mine[k].shape != theirs[k].shape]
    if missing:
        raise RuntimeError(f"backbone tensors without a counterpart: {missing[:5]}")
    with torch.no_grad():
        for k, v in theirs.items():
            v.copy_(mine[k])
    return len(theirs)


@contextlib.contextmanager
def no_download():
    """anomalib's STFPM asks timm for pretrained teacher weights; build it without (ours are
    copied in afterwards)."""
    import timm

    create = timm.create_model

    def offline(*args, **kwargs):
        kwargs["pretrained"] = False
        return create(*args, **kwargs)

    timm.create_model = offline
    try:
        yield
    finally:
        timm.create_model = create


def anomalib_model(name: str, mine, size: int):
    """anomalib's torch model configured like `mine`, with its backbone weights."""
    from anomalib.models.image.fastflow.torch_model import FastflowModel
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from anomalib.models.image.stfpm.torch_model import STFPMModel

    cfg = mine.config
    with no_download():
        if name == "padim":
            from anomaly_core.detectors.padim import n_features

            model = PadimModel(cfg.backbone, list(cfg.layers), pre_trained=False,
                               n_features=n_features(cfg, sum(mine.backbone.channels)))
            copy_weights(mine.backbone.body, model.feature_extractor.feature_extractor)
        elif name == "patchcore":
            model = PatchcoreModel(list(cfg.layers), cfg.backbone, pre_trained=False,
                                   num_neighbors=cfg.num_neighbors)
            copy_weights(mine.backbone.body, model.feature_extractor.feature_extractor)
        elif name == "fastflow":
            model = FastflowModel((size, size), cfg.backbone, pre_trained=False,
                                  flow_steps=cfg.flow_steps, hidden_ratio=cfg.hidden_ratio,
                                  conv3x3_only=cfg.backbone == "resnet18")
            copy_weights(mine.backbone.body, model.feature_extractor)
        else:
            model = STFPMModel(list(cfg.layers), cfg.backbone)
            copy_weights(mine.teacher.body, model.teacher_model.feature_extractor)
            copy_weights(mine.student.body, model.student_model.feature_extractor)
    return model


def fit_anomalib(name: str, model, train, batch_size: int, epochs: int, device: str) -> None:
    import torch

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    batches = [((train[i:i + batch_size].to(device)) - mean) / std
               for i in range(0, len(train), batch_size)]
    model.train()
    if name in ("padim", "patchcore"):
        with torch.no_grad():
            for x in batches:
                model(x)
        model.fit() if name == "padim" else model.subsample_embedding(0.1)
        model.eval()
        return
    if name == "fastflow":
        from anomalib.models.image.fastflow.loss import FastflowLoss

        opt = torch.optim.Adam(model.parameters(), lr=0.001, weight_decay=0.00001)
        loss_fn = FastflowLoss()
    else:
        from anomalib.models.image.stfpm.loss import STFPMLoss

        opt = torch.optim.SGD(model.student_model.parameters(), lr=0.4, momentum=0.9,
                              dampening=0.0, weight_decay=0.001)
        loss_fn = STFPMLoss()
    for _ in range(epochs):  # their lightning modules' training step, without lightning
        for x in batches:
            opt.zero_grad()
            loss_fn(*model(x)).backward()
            opt.step()
    model.eval()


def child(impl: str, name: str, args: argparse.Namespace) -> list[dict]:
    """One implementation of one detector: fit, then per precision time the forward and score the
    test set (a row each)."""
    import torch

    from anomaly_core.training.fit import fit
    from tests.helpers import TensorImages

    torch.manual_seed(0)
    device = args.device
    train, test, labels, masks = load_split(args.data, args.size)
    config = {"image_size": args.size, "weights": args.weights, **json.loads(args.config)}
    mine = ours(name, config)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if impl == "ours":
        model = mine
        fit(model, TensorImages(train), batch_size=args.batch_size, epochs=args.epochs,
            device=device)
        model.to(device).eval()

        def forward(x):
            out = model(x)
            return out.score, out.map
    else:
        model = anomalib_model(name, mine, args.size).to(device)
        del mine
        fit_anomalib(name, model, train, args.batch_size, args.epochs, device)
        forward = anomalib_forward(model, device)
    sync = synchronizer(device)
    sync()
    fit_s = time.perf_counter() - start
    if args.save:  # for the alternating timing (race) of the two fitted models
        torch.save(model, args.save)
    rows = []
    for precision in args.precisions.split(","):
        rows.append({"detector": name, "impl": impl, "precision": precision, "fit_s": fit_s,
                     **timed(model, forward, impl, precision, test, labels, masks, args)})
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for row in rows:
        row["peak_mb"] = peak
    return rows


def anomalib_forward(model, device: str):
    """anomalib's torch model on images in [0, 1]: (scores, maps)."""
    import torch

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def forward(x):
        out = model((x - mean) / std)
        return out.pred_score.flatten(), out.anomaly_map[:, 0]
    return forward


def runner(model, forward, impl: str, precision: str, test, device: str):
    """(run, test images as run takes them) for one fitted model at one precision. Ours through
    the job's Scorer (uint8 in, channels_last, BatchNorms folded, 16-bit networks with a float32
    rerun of a batch that overflows); anomalib's model under torch.autocast, what Lightning's
    "16-mixed" does."""
    import torch

    from anomaly_core.features.precision import LOW_DTYPES
    from anomaly_core.scoring.scorer import Scorer

    if impl == "ours":  # the test files are PNGs: x * 255 is exact
        scorer = Scorer(bench_artifact(model), device=device, precision=precision)

        def run(x):
            out = scorer(x)
            return out.score, out.map
        return run, (test * 255).round().to(torch.uint8)

    def run(x):
        with (torch.autocast(device_type=x.device.type, dtype=LOW_DTYPES[precision])
              if precision != "fp32" else contextlib.nullcontext()):
            s, m = forward(x)
        return s.float(), m.float()
    return run, test


def timed(model, forward, impl: str, precision: str, test, labels, masks, args) -> dict:
    """Forward images/s (this model alone) and AUROCs of one fitted model at one precision.
    AUROCs are left out (None) when scores are not finite."""
    import numpy as np
    import torch

    from anomaly_core.training.metrics import image_auroc, pixel_auroc

    device = args.device
    run, test = runner(model, forward, impl, precision, test, device)
    sync = synchronizer(device)
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(test), args.batch_size):
            s, m = run(test[i:i + args.batch_size].to(device))
            scores.append(s.cpu())
            maps.append(m.cpu())
        batch = test[: args.batch_size].to(device)
        run(batch)
        sync()
        calls, start = 0, time.perf_counter()
        while calls < 2 or (time.perf_counter() - start < args.seconds and calls < 100):
            run(batch)
            calls += 1
        sync()
        rate = calls * len(batch) / (time.perf_counter() - start)
    scores, maps = torch.cat(scores).numpy(), torch.cat(maps).numpy()
    finite = bool(np.isfinite(scores).all() and np.isfinite(maps).all())
    return {"images_per_s": rate, "finite": finite,
            "image_auroc": image_auroc(labels.numpy(), scores) if finite else None,
            "pixel_auroc": pixel_auroc(masks.numpy(), maps) if finite else None}


def profiled(run, batch, calls: int, device: str, top: int = 6) -> dict:
    """Where one forward's time goes, from torch.profiler over `calls` calls: wall ms per call;
    on a GPU, the kernels' summed time per call and its share of the wall time ("busy": well
    under 1 means the host's launches and waits, not the GPU, set the pace) and kernel launches
    per call; the `top` aten ops by their own time (device time on a GPU, CPU time on a CPU)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    sync = synchronizer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        run(batch)
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                run(batch)
            sync()
            wall = (time.perf_counter() - start) / calls
    out = {"wall_ms": wall * 1e3}

    def own(e) -> float:  # an op's own time, µs, on the device that matters here
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    if cuda:
        events = prof.events()
        kernel_us = (sum(e.time_range.elapsed_us() for e in events
                         if e.device_type == DeviceType.CUDA)  # kernels as their own events
                     or sum(k.duration for e in events for k in e.kernels))  # or their launchers'
        busy = kernel_us / 1e3 / calls
        out.update(kernel_ms=busy, busy=busy / out["wall_ms"],
                   launches=sum(1 for e in events if "LaunchKernel" in e.name) / calls)
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")), key=own,
                 reverse=True)
    out["top"] = [(e.key[6:], round(own(e) / 1e3 / calls, 3)) for e in ops[:top]]
    return out


def race(name: str, paths: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Forward images/s of both fitted models of `name`, per precision, timed in alternation
    in one process: `args.rounds` rounds of each for about seconds / rounds. On a machine whose
    speed drifts (shared cores, clocks), both sides see the same drift, so their ratio holds
    where the one-model-per-process times do not. Keys "<impl> <precision>"."""
    import torch

    device = args.device
    _, test, _, _ = load_split(args.data, args.size)
    models = {impl: torch.load(path, map_location=device, weights_only=False).eval()
              for impl, path in paths.items()}
    sync = synchronizer(device)
    out = {}
    for precision in args.precisions.split(","):
        runs = {}
        for impl, model in models.items():
            forward = anomalib_forward(model, device) if impl == "anomalib" else None
            run, images = runner(model, forward, impl, precision, test, device)
            batch = images[: args.batch_size].to(device)
            with torch.no_grad():
                run(batch)  # warm-up
                sync()
                start = time.perf_counter()
                run(batch)
                sync()
            calls = max(1, round(args.seconds / args.rounds / (time.perf_counter() - start)))
            runs[impl] = (run, batch, calls)
        spent = dict.fromkeys(runs, 0.0)
        done = dict.fromkeys(runs, 0)
        with torch.no_grad():
            for _ in range(args.rounds):
                for impl, (run, batch, calls) in runs.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        run(batch)
                    sync()
                    spent[impl] += time.perf_counter() - start
                    done[impl] += calls * len(batch)
        out.update({f"{impl} {precision}": done[impl] / spent[impl] for impl in runs})
        if args.profile:
            for impl, (run, batch, calls) in runs.items():
                try:
                    out[f"profile {impl} {precision}"] = profiled(run, batch, calls, device)
                except Exception as err:  # a profiler gap must not lose the timings above
                    out[f"profile {impl} {precision}"] = {"error": repr(err)[:200]}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detectors", default=",".join(DETECTORS))
    p.add_argument("--train", type=int, default=64, help="training images")
    p.add_argument("--test", type=int, default=64, help="test images (half defective)")
    p.add_argument("--size", type=int, default=256, help="image and model resolution")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1, help="epochs of FastFlow and STPM")
    p.add_argument("--weights", default="random", help="random, or imagenet where it resolves")
    p.add_argument("--backbone", help="one backbone for all (default: each of ours' defaults)")
    p.add_argument("--seconds", type=float, default=10.0, help="forward timing per model")
    p.add_argument("--rounds", type=int, default=10,
                   help="alternations of the two fitted models' forward timing (0: none)")
    p.add_argument("--profile", action="store_true",
                   help="after the alternated timing, profile each forward (torch.profiler): "
                   "kernel time and launches per batch on a GPU, the top ops")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--precisions", help="forward precisions, comma list (default: fp32, plus "
                   "fp16 on a GPU: ours' job path against anomalib under autocast)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per model")
    p.add_argument("--smoke", action="store_true",
                   help="tiny, resnet18, PatchCore only unless --detectors, in this process (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "vs_anomalib.json"))
    p.add_argument("--child", nargs=2, metavar=("IMPL", "DETECTOR"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--race", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.test, args.size, args.batch_size = 4, 4, 64, 2
        args.backbone, args.seconds = "resnet18", 0.0
        args.detectors = "patchcore" if args.detectors == ",".join(DETECTORS) else args.detectors
    if not args.precisions:
        args.precisions = "fp32,fp16" if args.device.startswith("cuda") else "fp32"
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return {}
    if args.race:
        paths = {impl: os.path.join(args.save, f"{impl}.pt") for impl in IMPLS}
        print("RESULT " + json.dumps(race(args.race, paths, args)), flush=True)
        return {}
    set_env()
    work = tempfile.mkdtemp(prefix="bench-vs-anomalib-")
    data = os.path.join(work, "data")
    write_split(data, args.size, args.train, args.test)
    rows = []
    base = ["--data", data, "--size", str(args.size),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--weights",
            args.weights, "--seconds", str(args.seconds), "--rounds", str(args.rounds),
            "--device", args.device, "--precisions", args.precisions]
    base += ["--profile"] if args.profile else []

    def in_child(extra: list[str], what: dict):
        """A child process's RESULT, or `what` with the reason it gave none."""
        try:
            done = run_fresh("bench.vs_anomalib", *base, *extra, timeout=args.timeout)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            return (json.loads(lines[-1][7:]) if lines else
                    {**what, "error": done.stderr.strip()[-300:]})
        except subprocess.TimeoutExpired:
            return {**what, "error": f"timeout {args.timeout} s"}

    for name in args.detectors.split(","):
        config = json.dumps({"backbone": args.backbone} if args.backbone else {})
        saved = os.path.join(work, name)
        os.makedirs(saved, exist_ok=True)
        for impl in IMPLS:
            save = os.path.join(saved, f"{impl}.pt") if args.rounds else None
            if args.smoke:  # in this process: does it run (peak memory is then shared)
                got = child(impl, name, argparse.Namespace(**{
                    **vars(args), "data": data, "config": config, "save": save}))
            else:
                got = in_child(["--child", impl, name, "--config", config]
                               + (["--save", save] if save else []),
                               {"detector": name, "impl": impl})
                got = got if isinstance(got, list) else [got]
            rows += got
            print(json.dumps(got), flush=True)
        if args.rounds and all(os.path.exists(os.path.join(saved, f"{i}.pt")) for i in IMPLS):
            if args.smoke:
                paths = {impl: os.path.join(saved, f"{impl}.pt") for impl in IMPLS}
                rates = race(name, paths, argparse.Namespace(**{**vars(args), "data": data}))
            else:
                rates = in_child(["--race", name, "--save", saved], {})
            print(json.dumps({"race": name, **rates}), flush=True)
            for row in rows:
                key = f"{row['impl']} {row.get('precision')}"
                if row["detector"] == name and key in rates:
                    row["solo_images_per_s"] = row.get("images_per_s")
                    row["images_per_s"] = rates[key]
                    row["alternated"] = True
                    if f"profile {key}" in rates:
                        row["profile"] = rates[f"profile {key}"]
        shutil.rmtree(saved, ignore_errors=True)  # PaDiM's fitted models are GBs
    by = {(r["detector"], r["impl"], r.get("precision")): r for r in rows}
    for (name, impl, precision), a in by.items():
        b = by.get((name, "anomalib", precision), {})
        if impl == "ours" and "images_per_s" in a and "images_per_s" in b:
            a["speedup"] = a["images_per_s"] / b["images_per_s"]
            a["fit_speedup"] = b["fit_s"] / a["fit_s"]
    print(f"\n{args.train} train / {args.test} test images at {args.size} px, batch "
          f"{args.batch_size}, {args.weights} weights, on {args.device}; fit in fp32, forward "
          f"at each precision (x anomalib: against anomalib at the same precision); images/s "
          f"timed in {args.rounds} alternating rounds of the two fitted models in one process "
          f"where both fitted, 'alone' in each model's own process")
    print_table(rows, [("detector", "detector"), ("impl", "impl"), ("precision", "precision"),
                       ("fit_s", "fit s"),
                       ("images_per_s", "images/s"), ("solo_images_per_s", "alone"),
                       ("speedup", "x anomalib"),
                       ("fit_speedup", "fit x"), ("peak_mb", "peak MB"),
                       ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
                       ("error", "error")])
    profiles = [{"detector": r["detector"], "impl": r["impl"], "precision": r.get("precision"),
                 **{k: v for k, v in r["profile"].items() if k != "top"},
                 "top": ", ".join(f"{op} {ms:.2f}" for op, ms in r["profile"].get("top", []))}
                for r in rows if "profile" in r]
    if profiles:
        print("\nWhere a forward's time goes (torch.profiler, per batch; busy = kernel time / "
              "wall time on a GPU; top: aten ops by their own ms)")
        print_table(profiles, [("detector", "detector"), ("impl", "impl"),
                               ("precision", "precision"), ("wall_ms", "wall ms"),
                               ("kernel_ms", "kernel ms"), ("busy", "busy"),
                               ("launches", "launches"), ("top", "top ops (ms)"),
                               ("error", "error")])
    result = {"machine": machine(), "args": vars(args), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
