"""The shipped deployment files (deploy/): every trioproxy option they set exists, the HAProxy
configuration is valid for the HAProxy installed here and lists exactly the replicas of the
compose file, and the Kubernetes manifests validate against the Kubernetes API schemas.

Docker and a Kubernetes cluster are not needed: the files are read, HAProxy checks its
configuration (``haproxy -c``) and ``kubernetes-validate`` checks the manifests offline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import yaml

from trioproxy.config import ENV_PREFIX, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OPTIONS = {ENV_PREFIX + field.name.upper() for field in attrs.fields(Settings)}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    (doc,) = load(DEPLOY / "compose.yaml")
    return doc


def replica_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in doc["services"].items()
        if "TRIOPROXY_DATABASE_URL" in service.get("environment", {})
    }


def test_every_trioproxy_variable_of_the_compose_file_is_an_option() -> None:
    services = replica_services(compose())
    assert len(services) == 3
    names = set()
    for service in services.values():
        environment = service["environment"]
        assert {k for k in environment if k.startswith(ENV_PREFIX)} <= OPTIONS
        assert environment["TRIOPROXY_SECRET_KEY"].startswith("${TRIOPROXY_SECRET_KEY")
        assert environment["TRIOPROXY_DATABASE_URL"].startswith("postgresql://")
        names.add(environment["TRIOPROXY_REPLICA_NAME"])
        # compose waits longer than the replica drains before it kills
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > float(environment["TRIOPROXY_DRAIN_GRACE"]) + float(
            environment["TRIOPROXY_DRAIN_TIMEOUT"]
        )
    assert names == set(services)  # each its own name: its service's


def test_the_haproxy_servers_of_the_compose_file_are_its_replicas() -> None:
    doc = compose()
    haproxy = doc["services"]["haproxy"]
    servers = {v for k, v in haproxy["environment"].items() if re.fullmatch(r"REPLICA_\d+", k)}
    assert servers == {f"{name}:2455" for name in replica_services(doc)}
    numbers = sorted(int(k[8:]) for k in haproxy["environment"] if k.startswith("REPLICA_"))
    assert numbers == list(range(1, len(servers) + 1))  # REPLICA_1 up, none skipped
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]


def haproxy_check(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("haproxy")
    assert binary, "haproxy is not installed (the CI script installs Debian's haproxy)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICA_")} | environment
    return subprocess.run(
        [binary, "-c", "-f", str(DEPLOY / "haproxy.cfg")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_haproxy_configuration_is_valid_with_the_compose_environment() -> None:
    environment = {
        k: str(v)
        for k, v in compose()["services"]["haproxy"]["environment"].items()
        # compose resolves service names; haproxy -c on this host cannot
        if not k.startswith("REPLICA_")
    }
    environment |= {f"REPLICA_{n}": f"127.0.0.1:{2455 + n}" for n in range(1, 4)}
    result = haproxy_check(environment)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALERT" not in result.stderr and "WARNING" not in result.stderr, result.stderr


def test_the_haproxy_configuration_takes_one_to_nine_replicas() -> None:
    for count in (1, 9):
        environment = {f"REPLICA_{n}": f"127.0.0.1:{3000 + n}" for n in range(1, count + 1)}
        result = haproxy_check(environment)
        assert result.returncode == 0, result.stdout + result.stderr


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load(path)]


def test_the_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    import kubernetes_validate

    docs = manifests()
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_kubernetes_replicas_are_named_probed_and_given_the_shared_secret() -> None:
    docs = manifests()
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= OPTIONS
    assert env["TRIOPROXY_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for name in ("TRIOPROXY_SECRET_KEY", "TRIOPROXY_DATABASE_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert set(secret["stringData"]) <= OPTIONS
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["TRIOPROXY_DRAIN_GRACE"]["value"]) + float(
        env["TRIOPROXY_DRAIN_TIMEOUT"]["value"]
    )
    services = [d for d in docs if d["kind"] == "Service"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert all(s["spec"]["selector"].items() <= labels.items() for s in services)
