"""The model registry: MLflow's tracking server and Model Registry, as teams already run them.

One registered model per product; each training run is an MLflow run (parameters, per-epoch and
validation metrics, the training summary) and registers its artifact as a new version whose
source is the artifact's own URI (our model.json + weights.safetensors stay where they are).
Aliases say which version scores: `champion` (live) and `candidate` (the latest, until
promoted). MLflow keeps no history of alias moves, so each move is a tag on the version it
moved to (`moved.<alias>.<time>`: who, and from which version); rollback reads them.

Only a job's driver talks to the registry; workers get artifact URIs. MLFLOW_TRACKING_URI names
the team's server; unset, an embedded SQLite store under ./mlruns (DEFAULT_HOME).
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from anomaly_core.errors import RegistryError
from anomaly_core.scoring.schema import PRODUCT_NAME

CHAMPION, CANDIDATE = "champion", "candidate"
DEFAULT_HOME = "mlruns"  # the embedded store's folder, relative to where the job runs
MOVE_TAG = "moved."
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?/?$")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store under ./mlruns."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.abspath(os.path.join(DEFAULT_HOME, "mlflow.db"))


def shown_uri() -> str:
    """The tracking URI for messages, without any user:password@."""
    return _redacted(tracking_uri())


def _redacted(text: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//", text)


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def check_product(name: str) -> str:
    """A product name that is also a valid registered model name and Hive partition value."""
    if not PRODUCT_NAME.fullmatch(name or ""):
        raise ValueError(f"product {name!r}: use letters, digits, '_', '-' or '.', starting with a "
                         "letter or digit (it names the registered model and a partition)")
    return name


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a product's model, as the registry has it."""

    product: str
    version: int
    source: str  # the artifact's URI (model.json + weights.safetensors)
    run_id: str | None = None
    aliases: tuple[str, ...] = ()
    created_at: str = ""  # UTC, ISO 8601
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def uri(self) -> str:
        return f"models:/{self.product}/{self.version}"

    def describe(self) -> dict[str, Any]:
        """What a run records of the version it scored with (_SUCCESS.json, logs)."""
        return {"product": self.product, "version": self.version, "source": self.source,
                "aliases": list(self.aliases), "registry": shown_uri()}


@functools.cache
def _client(uri: str):
    import logging

    # Fail fast on an unreachable server: MLflow retries an HTTP request for minutes by default.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations on first use
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.search_registered_models(max_results=1)  # reachable: checked once per process and URI
    return c


def client():
    """The MLflow client for tracking_uri(), checked reachable; a failure names the URI."""
    try:
        return _client(tracking_uri())  # a failure is not cached: the next call tries again
    except Exception as exc:  # MLflow raises its own and requests' errors
        raise RegistryError(
            f"the model registry at {shown_uri()} cannot be reached ({type(exc).__name__}: "
            f"{_redacted(str(exc))[:300]}); check MLFLOW_TRACKING_URI (unset: an embedded "
            f"SQLite store in ./{DEFAULT_HOME})") from exc


def _version(mv) -> RegisteredVersion:
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
    return RegisteredVersion(product=mv.name, version=int(mv.version), source=mv.source,
                             run_id=mv.run_id, aliases=tuple(sorted(mv.aliases or ())),
                             created_at=created.isoformat(timespec="seconds"),
                             tags=dict(mv.tags or {}))


def resolve(uri: str) -> RegisteredVersion:
    """models:/<product>@<alias> or models:/<product>/<version> (models:/<product> means
    @champion) as the version it names now."""
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a registry URI; use models:/<product>@champion or "
                         "models:/<product>/<version>")
    name, alias, version = match["name"], match["alias"], match["version"]
    c = client()
    try:
        if version:
            mv = c.get_model_version(name, version)
        else:
            mv = c.get_model_version_by_alias(name, alias or CHAMPION)
    except Exception as exc:
        known = ", ".join(p for p in products()) or "none yet"
        what = f"version {version}" if version else f"alias @{alias or CHAMPION}"
        raise RegistryError(f"{uri}: product {name!r} has no {what} in the registry at "
                            f"{shown_uri()} (products: {known}); see python -m jobs.models show "
                            f"{name}") from exc
    return _version(mv)


def resolve_aliases(wanted: Iterable[str], alias: str = CHAMPION) -> dict[str, RegisteredVersion]:
    """The version `alias` names now for each wanted product that has it (a fleet run): one
    listing of the registered models, then one lookup per product found. A product missing
    from the result has no such model or alias; a registry that fails raises."""
    c, wanted, held, token = client(), set(wanted), {}, None
    try:
        while True:
            page = c.search_registered_models(max_results=1000, page_token=token)
            held.update({m.name: int(m.aliases[alias]) for m in page
                         if m.name in wanted and alias in (m.aliases or {})})
            token = page.token
            if not token:
                break
        return {p: _version(c.get_model_version(p, str(v))) for p, v in sorted(held.items())}
    except Exception as exc:  # MLflow raises its own and requests' errors
        raise RegistryError(f"the model registry at {shown_uri()} failed while resolving "
                            f"@{alias} of {len(wanted)} products ({type(exc).__name__}: "
                            f"{_redacted(str(exc))[:300]}); run the job again") from exc


def products() -> list[str]:
    """Every registered product, sorted."""
    c, names, token = client(), [], None
    while True:
        page = c.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            return sorted(names)


def versions(product: str) -> list[RegisteredVersion]:
    """A product's versions, newest first."""
    c = client()
    found = c.search_model_versions(f"name = '{check_product(product)}'")
    if not found:
        return []
    # Search results carry no aliases; the registered model has them all.
    held: dict[int, list[str]] = {}
    for alias, version in (c.get_registered_model(product).aliases or {}).items():
        held.setdefault(int(version), []).append(alias)
    return sorted((replace(_version(mv), aliases=tuple(sorted(held.get(int(mv.version), []))))
                   for mv in found), key=lambda v: -v.version)


def latest(product: str) -> RegisteredVersion | None:
    """The product's newest version (None for a product not registered yet)."""
    found = versions(product)
    return found[0] if found else None


def log_training(product: str, *, source: str, detector: str, params: dict[str, Any],
                 metrics: dict[str, float], history: Iterable[dict[str, Any]],
                 summary: dict[str, Any], tags: dict[str, str]) -> RegisteredVersion:
    """An MLflow run for one training (parameters, per-epoch metrics as steps, validation
    metrics, the summary) and a new registered version of `product` pointing at `source`.

    The new version becomes `candidate`; the first version of a product is also `champion`
    (there is nothing to compare it with); later ones go live with `promote`.
    """
    from mlflow.entities import Metric, Param, RunTag

    c = client()
    product = check_product(product)
    experiment = c.get_experiment_by_name(product)
    if experiment:
        experiment_id = experiment.experiment_id
    else:  # an embedded store keeps the runs' files beside its database, not in ./mlruns
        uri = tracking_uri()
        beside = (os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "artifacts", product)
                  if uri.startswith("sqlite:///") else None)
        experiment_id = c.create_experiment(product, artifact_location=beside)
    run = c.create_run(experiment_id, run_name=f"train-{detector}",
                       tags={"mlflow.user": _user(), "detector": detector})
    run_id, now = run.info.run_id, int(datetime.now(UTC).timestamp() * 1000)
    flat = {k: json.dumps(v) if isinstance(v, dict | list | tuple) else str(v)
            for k, v in {"detector": detector, **params}.items()}
    series = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _number(v)]
    for epoch in history:
        step = int(epoch.get("epoch", 0))
        series += [Metric(f"epoch_{k}", float(v), now, step) for k, v in epoch.items()
                   if k != "epoch" and _number(v)]
    for i in range(0, len(series), 1000):  # MLflow's limit per batch
        c.log_batch(run_id, metrics=series[i:i + 1000])
    params_list = [Param(k, v[:6000]) for k, v in flat.items()]
    for i in range(0, len(params_list), 100):
        c.log_batch(run_id, params=params_list[i:i + 100])
    c.log_batch(run_id, tags=[RunTag("artifact_uri", source)])
    c.log_text(run_id, json.dumps(summary, indent=2, default=str), "train_summary.json")
    c.set_terminated(run_id)
    if not c.search_registered_models(f"name = '{product}'"):
        c.create_registered_model(product, description=f"anomaly detection model of {product}")
    mv = c.create_model_version(product, source=source, run_id=run_id,
                                tags={"detector": detector, "trained_by": _user(), **tags})
    has_champion = _alias_version(c, product, CHAMPION) is not None
    _move(c, product, CANDIDATE, int(mv.version))
    if not has_champion:
        _move(c, product, CHAMPION, int(mv.version))
    return _version(c.get_model_version(product, mv.version))


def promote(product: str, version: int | None = None, alias: str = CHAMPION) -> tuple:
    """Point `alias` at `version` (default: the candidate); returns (old, new) versions."""
    c = client()
    check_product(product)
    if version is None:
        version = _alias_version(c, product, CANDIDATE)
        if version is None:
            raise RegistryError(f"{product} has no candidate to promote; name a version")
    c.get_model_version(product, str(version))  # fails for an unknown version
    old = _alias_version(c, product, alias)
    if old != version:
        _move(c, product, alias, version)
    return old, version


def rollback(product: str, alias: str = CHAMPION) -> tuple:
    """Point `alias` back at the version it held before its last move; returns (old, new)."""
    c = client()
    current = _alias_version(c, product, alias)
    if current is None:
        raise RegistryError(f"{product} has no @{alias} to roll back")
    moves = [m for m in history(product) if m["alias"] == alias and m["to"] == current]
    previous = moves[0]["from"] if moves else None
    if previous is None:
        raise RegistryError(f"@{alias} of {product} has had no other version to go back to")
    _move(c, product, alias, previous)
    return current, previous


def history(product: str) -> list[dict[str, Any]]:
    """Every alias move of a product, newest first: alias, from, to, at (UTC), by."""
    moves = []
    for v in versions(product):
        for key, value in v.tags.items():
            if key.startswith(MOVE_TAG):
                record = json.loads(value)
                moves.append({"alias": record["alias"], "from": record.get("from"),
                              "to": v.version, "at": record["at"], "by": record.get("by")})
    return sorted(moves, key=lambda m: m["at"], reverse=True)


def _alias_version(c, product: str, alias: str) -> int | None:
    try:
        return int(c.get_model_version_by_alias(product, alias).version)
    except Exception:
        return None


def _move(c, product: str, alias: str, version: int) -> None:
    old = _alias_version(c, product, alias)
    c.set_registered_model_alias(product, alias, str(version))
    now = datetime.now(UTC)
    record = {"alias": alias, "from": old, "at": now.isoformat(timespec="microseconds"),
              "by": _user()}
    c.set_model_version_tag(product, str(version),
                            f"{MOVE_TAG}{alias}.{now:%Y%m%dT%H%M%S%f}", json.dumps(record))


def _user() -> str:
    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except Exception:
        return "unknown"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
