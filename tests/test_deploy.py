"""The deployment files parse and agree with the worker: the Kubernetes base (deploy/k8s/),
docker-compose.yml with Prometheus and the Grafana dashboard. No cluster or Docker engine
runs them here, so these checks stand in: ports, probe commands, configuration keys,
time limits, and metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for resource in kustomization["resources"]:
        for doc in _docs(K8S / resource):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.fixture(scope="module")
def registry(k8s: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The ConfigMap's registry, loaded as a worker loads it (every key checked)."""
    from worker.settings import load_settings

    (config_map,) = k8s["ConfigMap"]
    data = yaml.safe_load(config_map["data"]["config.yaml"])
    return load_settings(**data)


def metric_names() -> set[str]:
    """Every sample name the worker's metrics can expose."""
    from worker.metrics import Metrics

    metrics = Metrics(["q"], redis_url="redis://127.0.0.1:1/0", hostname="h")
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names |= {f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count", "_created")}
    return (
        names
        | {"inference_queue_depth", "inference_queue_ready", "inference_queue_unacked"}
        | {
            "inference_generations_running",
            "inference_generations_waiting",
        }
    )


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_each_pool_serves_its_models_with_the_gpu_probes_and_metrics(
    k8s: dict[str, list[dict[str, Any]]], registry: Any
) -> None:
    pools = [d for d in k8s["Deployment"]]
    assert {p["metadata"]["name"] for p in pools} == {"inference-encoders", "inference-generate"}
    for pool in pools:
        spec = pool["spec"]["template"]["spec"]
        container = _container(pool)
        env = {e["name"]: e["value"] for e in container["env"]}
        served = json.loads(env["WORKER_SERVE"])
        assert set(served) <= set(registry.models), served
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # metrics: the port the registry turns on, named, and announced to Prometheus
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == registry.metrics_port
        assert pool["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(registry.metrics_port)
        # probes: the health module's command, reading the directory the worker writes to
        for probe, kind in (("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "live")):
            assert container[probe]["exec"]["command"] == ["python", "-m", "worker.health", kind]
        assert env["WORKER_HEALTH_DIR"] == registry.health_dir
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts[env["WORKER_HEALTH_DIR"]]]
        assert (
            volumes[mounts[str(Path(env["WORKER_CONFIG"]).parent)]]["configMap"]["name"] == "inference-worker-registry"
        )
        # a warm shutdown may take the longest time limit
        assert spec["terminationGracePeriodSeconds"] > max(registry.time_limits.values())
        assert container["command"][:4] == ["celery", "-A", "worker", "worker"]


def test_keda_scales_each_pool_on_the_depth_the_workers_report(
    k8s: dict[str, list[dict[str, Any]]], registry: Any
) -> None:
    pools = {d["metadata"]["name"]: d for d in k8s["Deployment"]}
    names = metric_names()
    for scaled in k8s["ScaledObject"]:
        pool = pools[scaled["spec"]["scaleTargetRef"]["name"]]
        served = json.loads({e["name"]: e["value"] for e in _container(pool)["env"]}["WORKER_SERVE"])
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        metric, queue = re.fullmatch(r'max\((\w+)\{queue="([^"]+)"\}\)', query).groups()  # type: ignore[union-attr]
        assert metric == "inference_queue_depth" and metric in names, "not LLEN: ready + unacked"
        assert queue in {registry.queue_of(alias) for alias in served}


def test_the_health_module_is_the_probe(tmp_path: Path) -> None:
    from worker.health import main

    assert main(["live", "--dir", str(tmp_path)]) == 1
    (tmp_path / "live").touch()
    assert main(["live", "--dir", str(tmp_path)]) == 0
    assert main(["ready", "--dir", str(tmp_path)]) == 1
    (tmp_path / "ready").touch()
    assert main(["ready", "--dir", str(tmp_path)]) == 0


def test_compose_scrapes_every_worker_and_the_dashboard_reads_real_metrics() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker")}
    assert workers and {"redis", "prometheus", "grafana"} <= set(services)
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    from worker.settings import WorkerSettings

    for name, service in workers.items():
        env = service["environment"]
        assert f"{name}:{env['WORKER_METRICS_PORT']}" in targets
        assert service["healthcheck"]["test"][1:] == ["python", "-m", "worker.health", "ready"]
        for key in env:  # every setting the compose file gives is one the worker has
            assert key.removeprefix("WORKER_").lower() in WorkerSettings.model_fields, key
    assert "--appendonly" in services["redis"]["command"]
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "fleet.json").read_text())
    names = metric_names()
    used = {
        m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"inference_\w+", t["expr"])
    }
    assert used and used <= names, used - names
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]
