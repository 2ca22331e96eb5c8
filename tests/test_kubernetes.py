"""deploy/kubernetes/ checked without a cluster (issue 20, point 7).

No kubeconform or kubectl dry run can be installed from the registries this project
uses, so each manifest is checked against the Kubernetes API's own models (the official
Python client's generated types: every field name and type, required fields), and the
pieces are checked against each other and against relay: selectors match the pod's
labels, probes reach /readyz and /healthz, the ConfigMap's relay.yaml passes relay's
validation with the StatefulSet's environment, the grace period covers the shutdown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config.loading import load_config_with_sources

client = pytest.importorskip("kubernetes.client", reason="pip install -e '.[test]'")
ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
# Kinds outside the core API, checked by hand below.
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def manifests(directory: Path = K8S) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file"] = path.name
                docs.append(doc)
    return docs


def _model(api_version: str, kind: str) -> type:
    group_version = api_version.split("/")[-1]  # apps/v1 -> v1
    name = group_version[0].upper() + group_version[1:] + kind  # V1StatefulSet
    model = getattr(client, name, None)
    assert model is not None, f"unknown kind {api_version} {kind}"
    return model


def schema_problems(node: Any, type_name: str, path: str) -> list[str]:
    """Every key unknown to the API's type, and every value of the wrong shape."""
    if type_name.startswith("List["):
        if not isinstance(node, list):
            return [f"{path}: must be a list"]
        inner = type_name[5:-1]
        return [p for i, item in enumerate(node)
                for p in schema_problems(item, inner, f"{path}[{i}]")]
    if type_name.startswith("Dict["):
        return [] if isinstance(node, dict) else [f"{path}: must be a mapping"]
    if type_name in ("str", "datetime"):
        return [] if isinstance(node, str) else [f"{path}: must be a string"]
    if type_name == "int":
        ok = isinstance(node, int) and not isinstance(node, bool)
        return [] if ok else [f"{path}: must be a whole number"]
    if type_name == "bool":
        return [] if isinstance(node, bool) else [f"{path}: must be true or false"]
    if type_name in ("object", "float"):
        return []
    model = getattr(client, type_name)
    if not isinstance(node, dict):
        return [f"{path}: must be a mapping ({type_name})"]
    by_json = {json: attr for attr, json in model.attribute_map.items()}
    problems = []
    for key, value in node.items():
        if key == "__file":
            continue
        if key not in by_json:
            problems.append(f"{path}.{key}: no such field in {type_name}")
            continue
        problems += schema_problems(value, model.openapi_types[by_json[key]], f"{path}.{key}")
    return problems


def validate(doc: dict[str, Any]) -> list[str]:
    where = f"{doc['__file']}: {doc.get('kind')}"
    if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM:
        return []
    model = _model(doc["apiVersion"], doc["kind"])
    problems = schema_problems(doc, model.__name__, where)
    if not problems:  # required fields and enums: the client's own checks
        data = {k: v for k, v in doc.items() if k != "__file"}
        try:
            client.ApiClient()._ApiClient__deserialize(data, model.__name__)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_every_manifest_matches_the_kubernetes_api_schema() -> None:
    docs = manifests()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Secret", "Service",
                     "Service", "ServiceMonitor", "StatefulSet"]
    assert [p for d in docs for p in validate(d)] == []
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def test_a_broken_manifest_is_caught(tmp_path: Path) -> None:
    """The check is worth something: a misspelt field, a wrong type and a missing
    required field each fail it."""
    text = (K8S / "statefulset.yaml").read_text()
    for broken, expected in (
        (text.replace("readinessProbe:", "readinesProbe:"), "readinesProbe: no such field"),
        (text.replace("replicas: 1", "replicas: one"), "replicas: must be a whole number"),
        (re.sub(r"\n        - name: relay\n          image: [^\n]*", "\n        - image: x",
                text), "validation error for V1Container\nname"),
    ):
        (tmp_path / "statefulset.yaml").write_text(broken)
        problems = [p for d in manifests(tmp_path) for p in validate(d)]
        assert any(expected in p for p in problems), (expected, problems)


def _pod(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (sts,) = by_kind(docs, "StatefulSet")
    return sts, sts["spec"]["template"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_the_pieces_fit_together() -> None:
    docs = manifests()
    sts, pod = _pod(docs)
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"smtp": 2525, "metrics": 9025}
    assert _matches(sts["spec"]["selector"]["matchLabels"], labels)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert sts["spec"]["serviceName"] in services
    for service in services.values():
        assert _matches(service["spec"]["selector"], labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    (monitor,) = by_kind(docs, "ServiceMonitor")
    scraped = [s for s in services.values()
               if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert any(p["name"] == "metrics" for s in scraped for p in s["spec"]["ports"])
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # One volume per pod while the queue is SQLite.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/relay"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_hardened_pod_read_only_root_and_no_privileges() -> None:
    _, pod = _pod(manifests())
    (container,) = pod["spec"]["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's USER
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/relay", "/tmp"}


def test_configmap_is_a_valid_relay_config_with_the_pods_environment(tmp_path: Path) -> None:
    """What the pod will load: the ConfigMap's relay.yaml with the container's env (the
    pod CIDR override), the Secret's file names, a grace period that covers shutdown."""
    docs = manifests()
    _, pod = _pod(docs)
    (container,) = pod["spec"]["containers"]
    (configmap,) = by_kind(docs, "ConfigMap")
    path = tmp_path / "relay.yaml"
    path.write_text(configmap["data"]["relay.yaml"])
    env = {e["name"]: e["value"] for e in container["env"]}
    config, sources = load_config_with_sources(path, secrets=False, environ=env)
    networks = [str(n) for n in config.listen.allowed_networks]
    assert "0.0.0.0/0" not in networks and "10.244.0.0/16" in networks
    assert sources["listen.allowed_networks"] == "RELAY_LISTEN__ALLOWED_NETWORKS"
    assert str(config.queue.path).startswith("/var/lib/relay/")
    (secret,) = by_kind(docs, "Secret")
    secret_mount = next(m["mountPath"] for m in container["volumeMounts"]
                        if m["name"] == "secrets")
    for account in config.accounts.values():
        if account.password_file:
            assert account.password_file.parent == Path(secret_mount)
            assert account.password_file.name in secret["stringData"]
    needed = config.shutdown.drain_delay + config.shutdown.grace + 5
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    assert config.metrics.enabled and config.metrics.port == 9025


# -- deploy/kubernetes/postgres/: several replicas on one PostgreSQL queue ------------
OVERLAY = K8S / "postgres"


def test_postgres_overlay_manifests_match_the_api_schema() -> None:
    docs = manifests(OVERLAY)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Secret"]
    assert [p for d in docs for p in validate(d)] == []
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../", "deployment.yaml"]
    patched = [p["path"] for p in kustomization["patches"] if "path" in p]
    assert sorted(patched) == ["configmap.yaml", "secret.yaml"]
    (deleted,) = [yaml.safe_load(p["patch"]) for p in kustomization["patches"] if "patch" in p]
    assert deleted["$patch"] == "delete" and deleted["kind"] == "StatefulSet"
    base = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    # The patches replace what the base has, by kind and name (else kustomize refuses).
    for doc in docs:
        if doc["__file"] in patched:
            assert (doc["kind"], doc["metadata"]["name"]) in base


def test_postgres_overlay_pods_fit_the_base_and_keep_no_state(tmp_path: Path) -> None:
    """The Deployment's pods are what the base's Service, PDB, NetworkPolicy select; no
    volume but the config, the secrets and /tmp; the ConfigMap is a valid relay config
    with the pod's environment, its queue the database, its password in the Secret."""
    docs = manifests(OVERLAY)
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    base = manifests()
    for kind, key in (("Service", "selector"), ("PodDisruptionBudget", "selector"),
                      ("NetworkPolicy", "podSelector")):
        for doc in by_kind(base, kind):
            selector = doc["spec"][key]
            assert _matches(selector.get("matchLabels", selector), labels), kind
    (container,) = pod["spec"]["containers"]
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"config", "secrets", "tmp"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["replicas"] > 1
    (configmap,) = by_kind(docs, "ConfigMap")
    path = tmp_path / "relay.yaml"
    path.write_text(configmap["data"]["relay.yaml"])
    env = {e["name"]: e["value"] for e in container["env"]}
    config, _ = load_config_with_sources(path, secrets=False, environ=env)
    assert config.queue.url is not None and config.queue.url.startswith("postgresql://")
    (secret,) = by_kind(docs, "Secret")
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "secrets")
    files = [config.queue.password_file] + [a.password_file for a in config.accounts.values()]
    for file in files:
        assert file is not None and file.parent == Path(mount)
        assert file.name in secret["stringData"]
    needed = config.shutdown.drain_delay + config.shutdown.grace + 5
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
