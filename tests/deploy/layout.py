"""What the deployment tests read: the repository's files, parsed, and the project's own facts
(settings, console scripts, HTTP routes, metrics) to check the deployment files against."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings

from llm_service.gateway.app import create_app
from llm_service.server.http import _app as service_http_app
from llm_service.server.metrics import ServiceMetrics
from llm_service.server.state import ServerState
from llm_service.settings import GatewaySettings, ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
SCRIPTS = ROOT / "scripts"
VENV = ROOT / ".venv"

# File names kustomize recognises as a kustomization.
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s (kustomizations excluded)."""
    return sorted(
        p
        for p in K8S.rglob("*")
        if p.suffix in (".yaml", ".yml") and p.name not in KUSTOMIZATION_NAMES
    )


def kustomizations() -> list[Path]:
    return sorted(p for name in KUSTOMIZATION_NAMES for p in K8S.rglob(name))


def all_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in yaml_documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    """The one resource of that kind and name under deploy/k8s."""
    found = [
        doc for _, doc in all_resources() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment; every variable given as a plain value."""
    env = {}
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: expected a plain value"
        assert isinstance(var["value"], str), f"{var['name']}: a value must be a string"
        env[var["name"]] = var["value"]
    return env


def env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads."""
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name.upper()}" for name in settings.model_fields}


def service_env_names() -> set[str]:
    return env_names(ServiceSettings)


def gateway_env_names() -> set[str]:
    return env_names(GatewaySettings)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@cache
def console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["project"]["scripts"])


@cache
def service_routes() -> frozenset[str]:
    """The GET routes of llm_service's plain-HTTP port, from the application itself."""
    state = ServerState(1)
    app = service_http_app(state, ServiceMetrics(state))
    return frozenset(r.resource.canonical for r in app.router.routes() if r.method == "GET")


@cache
def gateway_routes() -> frozenset[str]:
    """The GET routes of llm-gateway, from the application itself (its handlers are not run)."""
    app = create_app(SimpleNamespace())  # type: ignore[arg-type]
    return frozenset(r.path for r in app.routes if "GET" in getattr(r, "methods", set()))


def service_metric_names() -> set[str]:
    state = ServerState(1)
    text = ServiceMetrics(state).render().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def llama_build(
    variant: str | None, expr: str = "$CMAKE_ARGS", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Source scripts/llama-build.env with LLAMA_VARIANT (None: unset) and ``env``, and print
    ``expr``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **(env or {})}
    if variant is not None:
        env["LLAMA_VARIANT"] = variant
    return subprocess.run(
        ["bash", "-c", f'. scripts/llama-build.env && printf "%s" "{expr}"'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile: continuation lines joined, runs of spaces
    made one, comments left out."""
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        instruction, _, args = logical.strip().partition(" ")
        yield instruction.upper(), " ".join(args.split())
        logical = ""


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each stage of deploy/Dockerfile, by stage name; the global ARGs
    before the first FROM under ""."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"FROM {args}: name every stage"
            current = words[2]
            stages[current] = []
        stages[current].append((instruction, args))
    return stages


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def lock_entries(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a pip-compile style lock file."""
    entries: dict[str, tuple[str, set[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            name = canonicalize_name(match[1])
            entries[name] = (match[2], set())
        elif (digest := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)) and name:
            entries[name][1].add(digest[1])
    return {n: (v, frozenset(h)) for n, (v, h) in entries.items()}


def dependency_closure(requirements: list[str]) -> set[str]:
    """The packages ``requirements`` pull in, as this venv resolves them (canonical names)."""
    todo = [Requirement(r) for r in requirements]
    closure: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        wanted = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        if name in closure or not wanted:
            continue
        closure.add(name)
        todo += [Requirement(r) for r in importlib.metadata.requires(name) or []]
    return closure
