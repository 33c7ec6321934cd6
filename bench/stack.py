"""The stack the benchmarks drive: nats-server, executors and gateways as separate processes,
against PostgreSQL when it is reachable (else SQLite)."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import grpc
import psycopg

from cli.launcher import Service, _start, free_port, start_agentrun, start_nats
from common.certs import write_dev_certificates
from common.tls import channel_credentials
from eventstore.persistence import StoreConfig

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
COLLECTOR_READY = "otlp-collector-ready"


def choose_store(url: str, tmp: Path) -> str:
    if url:
        return url
    postgres = StoreConfig.from_url(DEFAULT_POSTGRES).postgres
    assert postgres is not None
    try:
        with psycopg.connect(postgres.conninfo(), connect_timeout=2):
            pass
    except psycopg.OperationalError:
        return f"sqlite:///{tmp / 'data'}"
    return f"{DEFAULT_POSTGRES}?schema=bench_{uuid.uuid4().hex[:8]}"


class Stack:
    """nats-server, executors and a gateway for the benchmarks, as separate processes."""

    def __init__(
        self,
        url: str,
        tmp: Path,
        *,
        public_tls: bool = False,
        internal_tls: bool = False,
        metrics: bool = False,
        tracing: bool = False,
    ) -> None:
        """``public_tls``: the gateway serves TLS (clients use ``self.credentials``);
        ``internal_tls``: gateways and executors talk over mTLS. Certificates from common.certs.
        ``metrics``: every service serves /metrics (their addresses: ``metrics_targets``).
        ``tracing``: every service exports every span (100% sampling) over OTLP/gRPC to a
        collector stand-in process (``self.collector``: tests.otlp_collector)."""
        self.url = url
        self.metrics = metrics
        self.metrics_targets: list[str] = []
        self.tmp = tmp
        self.credentials: grpc.ChannelCredentials | None = None
        self.executor_env: dict[str, str] = {}
        self.gateway_env: dict[str, str] = {}
        if public_tls or internal_tls:
            certs = tmp / "certs"
            write_dev_certificates(certs)
            internal, public = certs / "internal", certs / "public"
            if public_tls:
                self.credentials = channel_credentials(public / "ca.pem")
                self.gateway_env |= {
                    "AGENTRUN_TLS_CERT": str(public / "server.pem"),
                    "AGENTRUN_TLS_KEY": str(public / "server-key.pem"),
                }
            if internal_tls:
                for role, env in (("executor", self.executor_env), ("gateway", self.gateway_env)):
                    env |= {
                        "AGENTRUN_INTERNAL_TLS_CA": str(internal / "ca.pem"),
                        "AGENTRUN_INTERNAL_TLS_CERT": str(internal / f"{role}.pem"),
                        "AGENTRUN_INTERNAL_TLS_KEY": str(internal / f"{role}-key.pem"),
                    }
        self.nats = start_nats(tmp / "nats", tmp / "logs")
        self.env = {
            "AGENTRUN_DATABASE_URL": url,
            "AGENTRUN_DATA_DIR": str(tmp / "data"),
            "AGENTRUN_NATS_URL": f"nats://{self.nats.address}",
            "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
            "AGENTRUN_GATEWAY_LISTEN": "127.0.0.1:0",
            "AGENTRUN_LOG_LEVEL": "WARNING",
            "AGENTRUN_DISPATCH_ACK_WAIT": "1.5",
        }
        self.services: list[Service] = []
        self._count = 0
        self.collector: Service | None = None
        if tracing:
            port = free_port()
            argv = [sys.executable, "-m", "tests.otlp_collector", "--port", str(port)]
            self.collector = _start(
                "otlp-collector", argv, os.environ, tmp / "logs", COLLECTOR_READY, port
            )
            self.env |= {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_TRACES_SAMPLER": "always_on",
            }

    def _metrics_env(self) -> dict[str, str]:
        if not self.metrics:
            return {}
        listen = f"127.0.0.1:{free_port()}"
        self.metrics_targets.append(listen)
        return {"AGENTRUN_METRICS_LISTEN": listen}

    def executor(self, port: int = 0) -> tuple[str, Service]:
        self._count += 1
        name = f"bench-executor-{self._count}"
        env = {
            **self.env,
            **self.executor_env,
            "AGENTRUN_EXECUTOR_ID": name,
            "AGENTRUN_EXECUTOR_LISTEN": f"127.0.0.1:{port}",
            **self._metrics_env(),
        }
        service = start_agentrun("executor", env, self.tmp / "logs", name)
        self.services.append(service)
        return name, service

    def gateway(self, executors: list[Service]) -> Service:
        self._count += 1
        target = ",".join(e.address for e in executors)
        service = start_agentrun(
            "gateway",
            {
                **self.env,
                **self.gateway_env,
                "AGENTRUN_EXECUTOR_TARGET": target,
                **self._metrics_env(),
            },
            self.tmp / "logs",
            f"bench-gateway-{self._count}",
        )
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.nats.stop()
        if self.collector is not None:
            self.collector.stop()


def rss_bytes(service: Service) -> int:
    """The resident set size of a service's process (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {service.name}")
