"""deploy/k8s: every manifest against the Kubernetes API schemas, and against the project itself
(settings, routes, ports, certificate names, the grace periods)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from tests.deploy.layout import (
    K8S,
    KUSTOMIZATION_NAMES,
    all_resources,
    console_scripts,
    containers,
    env_of,
    find,
    gateway_env_names,
    gateway_routes,
    kustomizations,
    manifest_files,
    port_of,
    service_env_names,
    service_metric_names,
    service_routes,
    yaml_documents,
)

# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships.
VERSIONS = (min(all_versions(), key=lambda v: tuple(map(int, v.split(".")))), "latest")
# Custom resources: not in the Kubernetes schemas, checked by test_cert_manager_example instead.
CRD_GROUPS = ("cert-manager.io/",)
IMAGE_UID = 10001  # the image's USER (tests/deploy/test_image.py checks the Dockerfile)
REPLICAS = ("llm-service", "llm-service-gpu")


def _validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(
        doc, kubernetes_validate.latest_version() if version == "latest" else version, strict=True
    )


def _resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in all_resources() if not d["apiVersion"].startswith(CRD_GROUPS)]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_the_kubernetes_api(version: str) -> None:
    resources = _resources()
    assert len(resources) >= 9
    for path, doc in resources:
        try:
            _validate(doc, version)
        except Exception as exc:
            pytest.fail(f"{path.relative_to(K8S)}: {doc['kind']} {doc['metadata']['name']}: {exc}")


def test_only_known_custom_resources_are_left_to_the_structure_check() -> None:
    """Nothing is skipped silently: every document is Kubernetes' own or cert-manager's."""
    for path, doc in all_resources():
        if doc["apiVersion"].startswith(CRD_GROUPS):
            assert path.parent.name == "examples", f"{path}: custom resources only in examples/"
            assert doc["kind"] in ("Issuer", "ClusterIssuer", "Certificate"), doc["kind"]


def test_the_validator_rejects_a_misspelled_field() -> None:
    deployment = copy.deepcopy(find("Deployment", "llm-service"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, "latest")


def test_kustomizations_list_every_manifest_of_their_folder() -> None:
    found = kustomizations()
    assert {p.relative_to(K8S).as_posix() for p in found} >= {
        "Kustomization",
        "gpu/Kustomization",
        "overlays/example/kustomization.yaml",
    }
    images = {
        c["image"].rpartition(":")[0]
        for _, d in all_resources()
        if d["kind"] == "Deployment"
        for c in containers(d)
    }
    for kustomization in found:
        (doc,) = yaml_documents(kustomization)
        assert doc["kind"] == "Kustomization"
        folder = kustomization.parent
        listed = set()
        for entry in doc["resources"]:
            target = (folder / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            if target.is_dir():
                assert any((target / n).is_file() for n in KUSTOMIZATION_NAMES), (
                    f"{kustomization}: {entry} is a folder without a kustomization"
                )
            listed.add(target)
        here = {p.resolve() for p in manifest_files() if p.parent == folder}
        assert here <= listed, f"{kustomization} leaves out {sorted(here - listed)}"
        for image in doc.get("images", []):
            assert image["name"] in images, f"{kustomization}: no container runs {image['name']}"


def test_kubectl_apply_f_on_the_folder_takes_only_manifests() -> None:
    """`kubectl apply -f deploy/k8s/` reads every .yaml/.yml/.json file of the folder (not its
    subfolders): a kustomization there would be sent as a resource, and fail."""
    top = [p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml", ".json")]
    assert top, "no manifest at the top of deploy/k8s"
    for path in top:
        assert path.name not in KUSTOMIZATION_NAMES
        for doc in yaml_documents(path):
            assert not doc["apiVersion"].startswith(CRD_GROUPS), f"{path}: needs cert-manager"
            assert doc["kind"] != "HorizontalPodAutoscaler", f"{path}: needs a metrics adapter"
    # The namespace is created first (kubectl applies files in name order).
    first = yaml_documents(sorted(top)[0])
    assert [d["kind"] for d in first] == ["Namespace"]
    namespace = first[0]["metadata"]["name"]
    for path, doc in all_resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{path}: {doc['kind']}"


def _replica(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    deployment = find("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container, env_of(container)


def _check_tls_volume(pod: dict[str, Any], mount_path: str) -> None:
    """Secret files the (non-root) process can read, and keys it does not refuse (0440)."""
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == ctx["runAsGroup"] == ctx["fsGroup"] == IMAGE_UID
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
    secret = volumes[mounts[mount_path]]["secret"]
    assert secret["defaultMode"] in (0o400, 0o440), oct(secret["defaultMode"])


def _check_probe(probe: dict[str, Any], container: dict[str, Any], routes: frozenset[str]) -> str:
    get = probe["httpGet"]
    assert get["path"] in routes, f"{get['path']} is not a route of the program"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert get["port"] in ports
    return str(get["path"])


@pytest.mark.parametrize("name", REPLICAS)
def test_replicas(name: str) -> None:
    pod, container, env = _replica(name)
    assert set(env) <= service_env_names(), set(env) - service_env_names()
    assert container.get("args") == ["serve"]
    assert int(env["LLM_LLAMA_SERVICE_THREADS"]) >= 1
    resources = container["resources"]
    for key in ("cpu", "memory"):
        assert resources["requests"][key] == resources["limits"][key]
    # llama.cpp would take every core of the node; its threads must fit the CPUs granted.
    assert int(env["LLM_N_THREADS"]) <= int(resources["limits"]["cpu"])

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port_of(env["LLM_GRPC_ADDR"]), "http": port_of(env["LLM_HTTP_ADDR"])}
    for address in ("LLM_GRPC_ADDR", "LLM_HTTP_ADDR"):
        assert env[address].startswith("0.0.0.0:"), "listen on the pod's address"

    routes = service_routes()
    assert _check_probe(container["livenessProbe"], container, routes) == "/livez"
    assert _check_probe(container["readinessProbe"], container, routes) == "/readyz"
    startup = container["startupProbe"]
    assert _check_probe(startup, container, routes) == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "10 minutes to load"

    assert pod["terminationGracePeriodSeconds"] > float(env["LLM_SHUTDOWN_GRACE"])
    _check_tls_volume(pod, "/certs")
    assert {env["LLM_TLS_CERT"], env["LLM_TLS_KEY"], env["LLM_TLS_CA"]} == {
        "/certs/tls.crt",
        "/certs/tls.key",
        "/certs/ca.crt",
    }
    # The default model is fetched into the volume the service reads it from.
    (init,) = pod["initContainers"]
    assert init["args"] == ["fetch-model"]
    assert env_of(init)["LLM_MODEL_CACHE"] == env["LLM_MODEL_CACHE"]
    model_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert model_mounts[env["LLM_MODEL_CACHE"]] in {m["name"] for m in container["volumeMounts"]}


def test_the_gpu_variant_asks_for_a_gpu_and_runs_the_cuda_image() -> None:
    pod, container, env = _replica("llm-service-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")
    assert all(c["image"].endswith(":cuda") for c in pod["initContainers"])
    assert env["LLM_N_GPU_LAYERS"] == "-1"
    _, cpu_container, _ = _replica("llm-service")
    assert cpu_container["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def test_the_headless_service_and_the_budget_cover_every_replica() -> None:
    service = find("Service", "llm-service-grpc")
    assert service["spec"]["clusterIP"] == "None"
    budget = find("PodDisruptionBudget", "llm-service")
    selectors = [service["spec"]["selector"], budget["spec"]["selector"]["matchLabels"]]
    pod_labels = []
    for name in REPLICAS:
        deployment = find("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod_labels.append(labels)
        for selector in selectors:
            assert selector.items() <= labels.items(), f"{name} is not selected by {selector}"
        grpc = port_of(env_of(_replica(name)[1])["LLM_GRPC_ADDR"])
        assert {"name": "grpc", "port": grpc, "targetPort": "grpc", "appProtocol": "grpc"} in (
            service["spec"]["ports"]
        )
    # The two Deployments do not select each other's pods.
    cpu, gpu = (find("Deployment", n)["spec"]["selector"]["matchLabels"] for n in REPLICAS)
    assert not cpu.items() <= pod_labels[1].items()
    assert not gpu.items() <= pod_labels[0].items()


def test_the_gateway_discovers_the_replicas_through_the_headless_service() -> None:
    deployment = find("Deployment", "llm-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert set(env) <= gateway_env_names(), set(env) - gateway_env_names()
    assert Path(container["command"][0]).name in console_scripts()
    assert Path(container["command"][0]).name == "llm-gateway"

    service = find("Service", "llm-service-grpc")
    namespace = service["metadata"]["namespace"]
    fqdn = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["LLM_GATEWAY_DISCOVER"] == f"{fqdn}:{grpc_port}"
    assert "," not in env["LLM_GATEWAY_DISCOVER"]
    assert float(env["LLM_GATEWAY_DISCOVERY_INTERVAL"]) > 0
    assert env["LLM_GATEWAY_TLS_SERVER_NAME"] == fqdn
    assert "LLM_GATEWAY_BACKENDS" not in env

    listen = port_of(env["LLM_GATEWAY_LISTEN"])
    assert env["LLM_GATEWAY_LISTEN"].startswith("0.0.0.0:")
    assert container["ports"] == [{"name": "http", "containerPort": listen}]
    routes = gateway_routes()
    assert _check_probe(container["livenessProbe"], container, routes) == "/healthz"
    assert _check_probe(container["readinessProbe"], container, routes) == "/readyz"
    assert pod["terminationGracePeriodSeconds"] > float(env["LLM_GATEWAY_SHUTDOWN_GRACE"])
    _check_tls_volume(pod, "/certs")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    keys = volumes["api-keys"]["secret"]
    assert env["LLM_GATEWAY_API_KEYS_FILE"].startswith(mounts["api-keys"] + "/")
    assert keys["defaultMode"] in (0o400, 0o440)

    gateway_service = find("Service", "llm-gateway")
    assert gateway_service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert gateway_service["spec"]["ports"][0]["targetPort"] == "http"
    assert find("PodDisruptionBudget", "llm-gateway")["spec"]["maxUnavailable"] == 1


def test_the_autoscaler_example_scales_replicas_on_the_queue_depth_metric() -> None:
    hpa = find("HorizontalPodAutoscaler", "llm-service")
    target = hpa["spec"]["scaleTargetRef"]
    assert find(target["kind"], target["name"])["apiVersion"] == target["apiVersion"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "llm_queue_depth"
    assert name in service_metric_names(), "the service does not export it"


def test_cert_manager_example() -> None:
    """cert-manager's resources are not in the Kubernetes schemas: their structure, and that
    they issue what the Deployments mount and expect, are checked here."""
    docs = yaml_documents(K8S / "examples" / "cert-manager.yaml")
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    certificates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    assert len(issuers) + len(certificates) == len(docs)
    for issuer in issuers.values():
        assert issuer["apiVersion"] == "cert-manager.io/v1"
        assert len(set(issuer["spec"]) & {"selfSigned", "ca"}) == 1
        if "ca" in issuer["spec"]:
            ca_secret = issuer["spec"]["ca"]["secretName"]
            assert any(
                c["spec"]["secretName"] == ca_secret and c["spec"].get("isCA")
                for c in certificates.values()
            )
    by_secret = {}
    for cert in certificates.values():
        spec = cert["spec"]
        assert cert["apiVersion"] == "cert-manager.io/v1"
        assert set(spec) <= {"isCA", "commonName", "dnsNames", "secretName", "duration",
                             "renewBefore", "privateKey", "issuerRef", "usages"}  # fmt: skip
        assert spec["issuerRef"]["kind"] == "Issuer" and spec["issuerRef"]["name"] in issuers
        assert spec.get("commonName") or spec.get("dnsNames")
        by_secret[spec["secretName"]] = spec

    # The Secrets the Deployments mount are the ones issued, with the names each side expects.
    service_tls = by_secret["llm-service-tls"]
    gateway_tls = by_secret["llm-gateway-tls"]
    gateway_pod = find("Deployment", "llm-gateway")["spec"]["template"]["spec"]
    gateway_env = env_of(gateway_pod["containers"][0])
    assert gateway_env["LLM_GATEWAY_TLS_SERVER_NAME"] in service_tls["dnsNames"]
    assert gateway_env["LLM_GATEWAY_DISCOVER"].rpartition(":")[0] in service_tls["dnsNames"]
    assert "server auth" in service_tls["usages"] and "client auth" in gateway_tls["usages"]
    for name in REPLICAS:
        pod, _, env = _replica(name)
        assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {
            "llm-service-tls"
        }
        assert gateway_tls["commonName"] in env["LLM_TLS_ALLOWED_CLIENTS"].split(",")
