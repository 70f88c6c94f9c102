"""Sweep a detector's hyperparameters with Ray Tune; every trial runs jobs.train's Ray Train fit.

    python -m jobs.tune --data DIR_OR_S3 --category capsule --detector simplenet \
        --param noise_std=loguniform:0.03:1.0 --num-samples 8 --output SWEEP_URI

Writes <output>/results.parquet (one row per trial, sorted by the objective), the best config as
<output>/best_config.yaml (for `jobs.train --config`), <output>/summary.json and, with
--save-best-artifact, <output>/best_model. Starting the same sweep again resumes it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

import yaml

from anomaly_core.config import TrainingConfig, parse_overrides
from jobs.common import log, redacted, run_job, setup_logging, use_storage_flags
from jobs.preflight import preflight_training
from jobs.trainer import (
    TrainerSettings,
    add_training_flags,
    detector_options,
    make_trainer,
    train_parser,
)

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCHERS = ("random", "grid", "optuna")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="sweep results folder (local or s3://)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=DIST:ARGS",
                   help="search dimension, repeatable: noise_std=loguniform:0.03:1.0, "
                   "flow_steps=randint:2:16, lr=uniform:1e-4:1e-2, "
                   "backbone=choice:resnet18,resnet50,wide_resnet50_2, coreset_ratio=grid:0.01,0.1")
    p.add_argument("--space", help="YAML: {detector: NAME, params: {name: 'loguniform:a:b', ...}, "
                   "options: {fixed options}}")
    p.add_argument("--search", choices=SEARCHERS, default="random",
                   help="random, grid (every combination of choice/grid values) or optuna (TPE)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha stops poor trials early on their per-epoch objective")
    p.add_argument("--num-samples", type=int, default=8, help="trials (random/optuna)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at once")
    p.add_argument("--name", help="sweep name (default sweep-<detector>); same name = resume")
    p.add_argument("--save-best-artifact", action="store_true",
                   help="train the best config once more and save it to <output>/best_model")
    add_training_flags(p)
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_concurrent < 1:
        p.error("--num-samples and --max-concurrent must be at least 1")
    return args


def parse_param(spec: str) -> tuple[str, str, list[Any]]:
    """'noise_std=loguniform:0.03:1.0' -> ('noise_std', 'loguniform', [0.03, 1.0])."""
    name, sep, rest = spec.partition("=")
    kind, _, values = rest.partition(":")
    if not sep or kind not in DISTRIBUTIONS or not values:
        raise ValueError(f"--param {spec!r}: expected NAME=KIND:ARGS with KIND one of {DISTRIBUTIONS}")
    sep = "," if kind in ("choice", "grid") else ":"
    parsed = [parse_overrides([f"v={v}"])["v"] for v in values.split(sep)]
    if kind in ("loguniform", "uniform", "randint") and len(parsed) != 2:
        raise ValueError(f"--param {spec!r}: {kind} takes two bounds, e.g. {kind}:1:10")
    return name, kind, parsed


def search_space(params: list[tuple[str, str, list]]) -> dict[str, Any]:
    """Ray Tune sampling objects for the parsed dimensions."""
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),  # both bounds included
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {name: make[kind](values) for name, kind, values in params}


def run_trial(params: dict, base: TrainingConfig, settings: TrainerSettings) -> None:
    """A Tune trial: jobs.train's fit on its own Ray Train workers, metrics sent to Tune.

    `base` (with the record lists) arrives by reference through tune.with_parameters. The Ray
    Train run is named after the trial, in the sweep's storage: a retried or restored trial
    resumes from its own last checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = replace(base, options={**base.options, **{k: params[k] for k in params["params"]}})
    trial = tune.get_context().get_trial_id()
    trainer = make_trainer(settings, config, name=f"trial-{trial}", callbacks=[TuneReportCallback()])
    trainer.fit()


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    use_storage_flags(args)
    from dataclasses import asdict

    from anomaly_core import storage
    from anomaly_core.detectors import detector_class, make_config
    from anomaly_core.scoring.schema import parquet_bytes
    from anomaly_core.training import sweep as sweep_lib

    name, fixed = detector_options(args)
    specs = list(args.param)
    if args.space:
        with open(args.space) as f:
            space_file = yaml.safe_load(f) or {}
        name = args.detector or space_file.get("detector", name)
        fixed.update(space_file.get("options", {}))
        specs += [f"{k}={v}" for k, v in space_file.get("params", {}).items()]
    params = [parse_param(s) for s in specs]
    sweep_lib.check_params(name, params, args.search)
    names = [p for p, _, _ in params]
    options = asdict(make_config(name, **fixed))
    args.storage_path = args.storage_path or storage.join(args.output, "tune")
    if args.save_best_artifact:  # the retrain registers: the registry must be there now
        from anomaly_core.model import registry

        registry.client()
    train, val = preflight_training(args, name, options, args.output)
    config = TrainingConfig.from_args(args, name, options, train, val, None)
    family = detector_class(name).family
    log.info("sweep %s over %s (%s search, %s), %d trials, objective %s; fixed %s", name,
             names, args.search, args.scheduler, args.num_samples,
             args.objective, json.dumps(redacted(fixed)))
    from ray import tune

    # Searchers and ASHA compare the objective of the epoch each fit keeps (its best so far).
    metric, mode = "kept_objective", "max"
    space = search_space([(p, "grid" if args.search == "grid" else k, v) for p, k, v in params])
    sweep = args.name or f"sweep-{name}"
    storage_uri = args.storage_path
    # Each trial's Ray Train checkpoints live in the sweep's storage, never on a node's disk.
    settings = replace(TrainerSettings.from_args(args),
                       storage_path=storage.join(storage_uri, f"{sweep}-trials"))
    param_space = {**space, "params": names}
    searcher = None
    if args.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=metric, mode=mode, seed=args.seed)
    scheduler = None
    if args.scheduler == "asha" and family == "gradient" and args.epochs > 1:
        # Memory detectors report once, so there is nothing to stop early.
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", metric=metric, mode=mode, max_t=args.epochs,
            grace_period=1, reduction_factor=2)
    tune_config = tune.TuneConfig(
        metric=None if scheduler else metric, mode=None if scheduler else mode,
        search_alg=searcher, scheduler=scheduler,
        num_samples=1 if args.search == "grid" else args.num_samples,
        max_concurrent_trials=args.max_concurrent,
    )
    storage_path, storage_fs = storage_uri, None
    if storage.is_s3(storage_path):
        storage_fs, storage_path = storage.filesystem(storage_path)
    # The trial itself only waits on its TorchTrainer, whose workers hold the real resources.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config, settings=settings), {"cpu": 0.01})
    experiment = f"{storage_path.rstrip('/')}/{sweep}"
    start = time.perf_counter()
    if tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        log.info("resuming sweep %s from %s", sweep, experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                   storage_filesystem=storage_fs, param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space, tune_config=tune_config,
            # A trial whose own actor was on a lost node runs again (its Ray Train run,
            # named after the trial, resumes from its last checkpoint); a lost training
            # worker is Ray Train's to replace (--max-failures both).
            run_config=tune.RunConfig(name=sweep, storage_path=storage_path,
                                      storage_filesystem=storage_fs,
                                      failure_config=tune.FailureConfig(
                                          max_failures=args.max_failures)),
        )
    from jobs.nodes import NodeWatch

    with NodeWatch(lambda: f"{args.max_concurrent} trial(s) at a time", what=f"sweep {sweep}",
                   then="each trial on it resumes from its last checkpoint (its Ray Train "
                        "workers, or the whole trial when its own actor was there)"):
        grid = tuner.fit()
    table = sweep_lib.results_table(grid, names)
    storage.write_bytes(storage.join(args.output, "results.parquet"), parquet_bytes(table))
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok" and r["objective"] is not None]
    if not ok:
        raise SystemExit(f"no trial finished with an objective; see {args.output}/results.parquet")
    best = ok[0]
    best_options = sweep_lib.best_options(best, fixed, names)
    best_config = {"detector": name, "options": best_options,
                   "objective": {args.objective: best["objective"]}, "epochs": args.epochs}
    storage.write_bytes(storage.join(args.output, "best_config.yaml"),
                        yaml.safe_dump(best_config, sort_keys=False).encode())
    print(sweep_lib.ranking(sweep, rows, names, best["objective"]))
    summary = {"sweep": sweep, "detector": name, "trials": len(rows), "finished": len(ok),
               "best": best, "best_config": best_config, "wall_s": round(time.perf_counter() - start, 1),
               "results": storage.join(args.output, "results.parquet")}
    if args.save_best_artifact:
        from jobs import train

        summary["best_model"] = storage.join(args.output, "best_model")
        log.info("training the best config into %s", summary["best_model"])
        train_summary = train.main(_train_argv(args, summary["best_model"], best_config))
        summary["best_model_version"] = train_summary["model_version"]
    storage.write_bytes(storage.join(args.output, "summary.json"),
                        json.dumps(summary, indent=2, default=str).encode())
    return summary


# Flags whose values reach the retrain otherwise: the best options (--set), or its own output.
_NOT_COPIED = {"help", "output", "detector", "config", "overrides", "lr", "storage_path"}


def _train_argv(args: argparse.Namespace, output: str, best: dict) -> list[str]:
    """jobs.train's argv for the best config, with every training flag the sweep was given."""
    argv = ["--output", output, "--detector", best["detector"]]
    probe = argparse.ArgumentParser(add_help=False)
    add_training_flags(probe)
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if action.dest in _NOT_COPIED or value is None or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    argv += [x for k, v in best["options"].items() for x in ("--set", f"{k}={json.dumps(v)}")]
    train_parser().parse_args(argv)  # the retrain's own flags: fail here, not after the sweep
    return argv


if __name__ == "__main__":
    run_job(main)
