"""docs/operations.md, "Running in production": the commands it gives match the deployment
files."""

from __future__ import annotations

import re
import shlex

from tests.deploy.layout import K8S, ROOT, all_resources, dockerfile_stages, find


def _section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(
        r"^## Running in production\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL
    )
    assert match, "docs/operations.md has no section 'Running in production'"
    return match[1]


def test_it_builds_every_image_variant_and_runs_compose_and_kubernetes() -> None:
    text = _section()
    variants = {n.partition("-")[2] for n in dockerfile_stages() if n.startswith("builder-")}
    for variant in variants:
        assert f"docker build -f deploy/Dockerfile --build-arg VARIANT={variant} " in text
    assert "docker compose -f deploy/compose.yaml up" in text
    assert "kubectl apply -f deploy/k8s/`" in text or "kubectl apply -f deploy/k8s/\n" in text
    named = r"`((?:\w+/)*[\w.-]+\.yaml|gpu/|overlays/example/|Kustomization)`"
    for path in re.findall(named, text):
        assert (K8S / path).exists() or (ROOT / path).exists(), path


def test_the_secrets_it_creates_are_the_ones_mounted() -> None:
    """Each Secret the Deployments mount is created by the README's commands, with the keys
    that the containers' settings name."""
    created: dict[str, set[str]] = {}
    # A command with its continuation lines (those ending in a backslash).
    pattern = r"kubectl -n llm create secret generic [^\n\\]*(?:\\\n[^\n\\]*)*"
    for command in re.findall(pattern, _section()):
        words = shlex.split(command.replace("\\\n", " "))
        name = words[words.index("generic") + 1]
        created[name] = {w.split("=")[1] for w in words if w.startswith("--from-file=")}
    mounted: dict[str, set[str]] = {}
    for _, doc in all_resources():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for var in container["env"]:
                path, _, key = var["value"].rpartition("/")
                if path in mounts and mounts[path] in secrets:
                    mounted.setdefault(secrets[mounts[path]], set()).add(key)
    assert set(mounted) == {"llm-service-tls", "llm-gateway-tls", "llm-gateway-api-keys"}
    for name, keys in mounted.items():
        assert keys <= created.get(name, set()), f"{name}: README creates {created.get(name)}"
    # The development certificate holds the name the gateway expects.
    gateway = find("Deployment", "llm-gateway")["spec"]["template"]["spec"]["containers"][0]
    server_name = next(v["value"] for v in gateway["env"] if v["name"].endswith("SERVER_NAME"))
    assert f"llm_service certs --out certs --san {server_name} --client-name llm-gateway" in (
        _section()
    )
