"""Which model scores which images, decided once on the driver from the registry and each
artifact's model.json (never the weights): one --model for every image, or for a fleet run
(--fleet) each product's registered model under an alias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from anomaly_core.errors import ArtifactError
from anomaly_core.model import registry
from anomaly_core.model.info import ArtifactInfo
from anomaly_core.scoring.runs import RunModel
from anomaly_core.scoring.schema import PRODUCT_NAME

log = logging.getLogger(__name__)


def single_model(uri: str) -> RunModel:
    """--model: a registry URI (models:/<product>@alias or /version) as the version it names
    now, or an artifact (its product: the detector's name, its version: the weights digest)."""
    if not registry.is_registry_uri(uri):
        info = ArtifactInfo.read(uri)
        return RunModel(product=info.name, version=info.model_version,
                        model_version=info.model_version, detector=info.name, uri=uri)
    version = registry.resolve(uri)
    alias = uri.split("@", 1)[1].strip("/") if "@" in uri else None
    if alias is None and "/" not in uri[len("models:/"):].strip("/"):
        alias = registry.CHAMPION  # models:/<product> means @champion
    return registered_model(version, alias)


def registered_model(version: registry.RegisteredVersion, alias: str | None) -> RunModel:
    """A registered version as a run's model; its weights digest as registered (read from the
    artifact's model.json when the version has no such tag)."""
    digest = version.tags.get("model_version") or ArtifactInfo.read(version.source).model_version
    return RunModel(product=version.product, version=str(version.version), model_version=digest,
                    detector=version.tags.get("detector", ""), uri=version.source,
                    registered=version.version, alias=alias)


def fleet_models(alias: str) -> Callable[[list[str]], list[RunModel]]:
    """For a fleet run: the products found in the inputs -> the models `alias` names now (one
    registry listing); products without one are left out (their images become error rows)."""
    def resolve(products: list[str]) -> list[RunModel]:
        found = registry.resolve_aliases(products, alias)
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda v: registered_model(v, alias), found.values()))
    return resolve


def read_artifacts(models: tuple[RunModel, ...]) -> tuple[dict[str, ArtifactInfo], dict[str, str]]:
    """Each model's model.json, checked to be the version the run scores with: (infos by
    product, the problem of each product whose artifact is unreadable or was overwritten)."""
    def read(model: RunModel) -> ArtifactInfo | str:
        try:
            info = ArtifactInfo.read(model.uri)
        except ArtifactError as exc:
            return str(exc)
        if info.model_version != model.model_version:
            what = (f"models:/{model.product}/{model.registered}" if model.registered
                    else "this run")
            return (f"{model.uri} holds model {info.model_version}, not the one {what} scores "
                    f"with ({model.model_version}): it was overwritten; train into a new "
                    "--output for each version")
        return info

    with ThreadPoolExecutor(8) as pool:
        found = dict(zip((m.product for m in models), pool.map(read, models)))
    problems = {p: v for p, v in found.items() if isinstance(v, str)}
    for product, problem in problems.items():
        log.error("product %s cannot be scored: %s", product, problem)
    return {p: v for p, v in found.items() if isinstance(v, ArtifactInfo)}, problems


def product_summary(model: RunModel, info: ArtifactInfo) -> dict[str, Any]:
    """What _SUCCESS.json records of a product's model besides the RunModel: the report reads
    these."""
    return {"model_uri": model.uri, "calibration": info.calibration.to_dict(),
            "registry": registry.shown_uri() if model.registered else None,
            "validation_metrics": info.validation_metrics}


def no_model_reason(product: str | None, alias: str, problems: dict[str, str]) -> str:
    """An error row's reason for an image that no model scores."""
    if not product:
        return ("no product in its path or manifest row; check --product-from (hive:KEY, "
                "folder:N or column)")
    if not PRODUCT_NAME.fullmatch(product):
        return (f"product {product!r} is not a product name (letters, digits, '_', '-' and '.', "
                "starting with a letter or digit); fix the manifest or the folder")
    if product in problems:
        return f"product {product!r}: {problems[product]}"
    return (f"product {product!r} has no model registered as models:/{product}@{alias}; train "
            f"it (python -m jobs.train --product {product} ...) or promote a version "
            f"(python -m jobs.models promote {product})")
