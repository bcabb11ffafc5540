"""The container image and the Kubernetes manifests: valid, and saying what the config says."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from supervisor.settings.config import Host, parse_config, split_host_port
from tests.conftest import ROOT

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
HOST = Host(memory_bytes=256 << 30, is_root=False, env={})


def resources() -> dict[str, dict]:
    return {doc["kind"]: doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_passes_the_offline_schemas_strictly(path):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Gi|Mi)", text).groups()
    return int(number) << (30 if unit == "Gi" else 20)


def test_the_daemonset_matches_the_config_it_mounts():
    found = resources()
    config = parse_config(found["ConfigMap"]["data"]["config.toml"], HOST)  # the real parser: it must load
    pod = found["DaemonSet"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == split_host_port(config.address)[1]
    assert ports["health"] == split_host_port(config.health_address)[1]
    assert ports["http"] == split_host_port(config.http_address)[1] and config.http_tls
    assert ports["metrics"] == split_host_port(config.metrics_address)[1] == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"]  # kubelet's gRPC probes speak no TLS
    limits = container["resources"]["limits"]
    assert quantity(limits["memory"]) > config.memory_budget and limits["nvidia.com/gpu"] == 1
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.shutdown_delay + config.shutdown_timeout
    assert config.tls_cert is not None and config.admin_tokens_file is not None  # TLS and tokens, not insecure
    assert found["Service"]["spec"]["clusterIP"] == "None"  # headless: clients see every pod
    assert found["PodDisruptionBudget"]["spec"]["selector"] == found["DaemonSet"]["spec"]["selector"]


def test_the_image_is_built_by_the_readmes_own_setup_and_runs_the_daemon_unprivileged():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    readme_setup = (ROOT / "README.md").read_text().split("```sh\n", 1)[1].splitlines()[0]
    assert readme_setup.startswith("bash deploy/setup.sh")
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN ")]
    assert any("bash deploy/setup.sh" in line for line in runs)  # one source of truth for the install
    assert re.search(r"^USER llm-supervisor$", dockerfile, re.M)
    assert '"/opt/llm-supervisor/.venv/bin/llm-supervisord"' in dockerfile.split("ENTRYPOINT", 1)[1].splitlines()[0]
    assert "FROM build-${FLAVOR}" in dockerfile and "FROM run-${FLAVOR}" in dockerfile  # cpu or cuda
