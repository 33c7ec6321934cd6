"""The observing part of docker-compose.yml against the code it observes: the Grafana dashboard
(deploy/grafana) queries only metrics (and labels) that the services export, Prometheus
(deploy/prometheus) scrapes every gateway and executor on its AGENTRUN_METRICS_LISTEN port,
their traces go to the collector service (deploy/otel-collector) on the port it receives on,
and the files the services mount exist. Docker itself is not needed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import common.grpc_metrics
import common.metrics
from common import tracing
from executor.cluster_metrics import GAUGES
from tests.test_deployment import (
    ROOT,
    command,
    environment,
    listen_port,
    our_servers,
    service_settings,
    services,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "agentrun.json"
# Labels Prometheus adds to every scraped series, and a histogram's bucket bound.
SCRAPE_LABELS = {"job", "instance", "le"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def exported() -> dict[str, set[str]]:
    """Every series name the services export, with its labels: the metric objects of
    common.metrics and common.grpc_metrics, the cluster gauges, prometheus-client's own."""
    found: dict[str, set[str]] = {}
    for module in (common.metrics, common.grpc_metrics):
        for metric in vars(module).values():
            if isinstance(metric, MetricWrapperBase):
                for suffix in SUFFIXES[str(metric._type)]:
                    found[metric._name + suffix] = set(metric._labelnames)
    found.update({name: set() for name in GAUGES})
    for family in REGISTRY.collect():
        for sample in family.samples:
            found.setdefault(sample.name, set(sample.labels))
    return found


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert found, "the dashboard queries nothing"
    return found


_FUNCTIONS = {"sum", "max", "min", "avg", "rate", "irate", "increase", "histogram_quantile", "by"}
_SERIES = re.compile(r"\b([a-z_][a-z0-9_]*)\s*(\{[^}]*\})?\s*(\[[^\]]*\])?")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-z_][a-z0-9_]*)\s*(=~|!~|!=|=)")


def test_every_metric_and_label_the_dashboard_queries_is_exported() -> None:
    series = exported()
    for query in queries():
        without_groupings = _BY.sub("", query)
        names = [
            m[1]
            for m in _SERIES.finditer(without_groupings)
            if m[1] not in _FUNCTIONS and "_" in m[1] and not m[1].startswith("__")
        ]
        assert names, f"no metric in {query!r}"
        labels: set[str] = set()
        for name in names:
            assert name in series, f"the dashboard queries {name}, which nothing exports"
            labels |= series[name]
        used = {label.strip() for group in _BY.findall(query) for label in group.split(",")}
        used |= {m[1] for m in _MATCHER.finditer(query)}
        unknown = used - labels - SCRAPE_LABELS - {""}
        assert not unknown, f"{query!r} uses labels {unknown} that {names} do not have"


def test_the_dashboards_data_source_is_the_provisioned_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    provisioned = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/agentrun.yml").read_text()
    )
    (prometheus,) = [d for d in provisioned["datasources"] if d["type"] == "prometheus"]
    assert variable["current"]["value"] == prometheus["uid"]
    url = urlsplit(prometheus["url"])
    assert url.hostname in services(), f"Grafana's Prometheus {url.hostname} is no service"
    for panel in panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/agentrun.yml").read_text()
    )
    (dashboards,) = provider["providers"]
    assert mounts("grafana")[dashboards["options"]["path"]] == DASHBOARD.parent


def mounts(service: str) -> dict[str, Path]:
    """A service's bind mounts of files of this repository: where they appear -> the file."""
    found = {}
    for volume in services()[service].get("volumes", []):
        source, _, target = str(volume).partition(":")
        if source.startswith("./"):
            found[target.partition(":")[0]] = (ROOT / source).resolve()
    return found


def test_mounted_files_exist() -> None:
    for name in services():
        for target, source in mounts(name).items():
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"


def test_prometheus_scrapes_every_gateway_and_executor_on_its_metrics_port() -> None:
    config = yaml.safe_load(mounts("prometheus")["/etc/prometheus/prometheus.yml"].read_text())
    scraped: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            scraped.setdefault(job["job_name"], set()).update(static["targets"])
    expected: dict[str, set[str]] = {}
    for name, service in our_servers().items():
        listen = service_settings(service).metrics_listen
        assert listen, f"{name} serves no metrics (AGENTRUN_METRICS_LISTEN)"
        role = command(service)[0]
        expected.setdefault(f"agentrun-{role}", set()).add(f"{name}:{listen_port(listen)}")
    assert scraped == expected


def test_traces_go_to_the_collector_which_passes_them_to_a_service() -> None:
    collector_config = yaml.safe_load(
        mounts("otel-collector")["/etc/otelcol/config.yaml"].read_text()
    )
    receiver = collector_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for name, service in our_servers().items():
        env = environment(service)
        assert tracing.wanted(env), f"{name} exports no traces"
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector", name
        assert endpoint.port == listen_port(receiver), f"{name}: {endpoint.port} vs {receiver}"
    pipeline = collector_config["service"]["pipelines"]["traces"]
    for exporter in pipeline["exporters"]:
        target = collector_config["exporters"][exporter].get("endpoint")
        if target is not None:
            assert target.rpartition(":")[0] in services(), f"{exporter} sends to {target}"
