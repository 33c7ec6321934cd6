"""Settings of the gateway and the executor, read from the environment (AGENTRUN_*).

| variable | default | meaning |
|---|---|---|
| AGENTRUN_DATABASE_URL | (SQLite under AGENTRUN_DATA_DIR) | postgresql://... or sqlite:///dir |
| AGENTRUN_DATA_DIR | ./.agentrun | SQLite files, send_email's outbox, nats data of `up` |
| AGENTRUN_NATS_URL | nats://127.0.0.1:4222 | NATS servers, comma separated |
| AGENTRUN_NATS_NAMESPACE | agentrun | keeps deployments that share a NATS apart |
| AGENTRUN_NATS_REPLICAS | 1 | copies of each JetStream stream: 3 in a 3-node cluster (survives |
|   |   | the loss of one NATS server), 1 on a single nats-server |
| AGENTRUN_EXECUTOR_TARGET | 127.0.0.1:50052 | the gateway's executors: host:port, a list of |
|   |   | ip:port (comma separated, round robin) or a gRPC target (dns:///executors:50052) |
| AGENTRUN_GATEWAY_LISTEN | 127.0.0.1:50051 | where the gateway listens |
| AGENTRUN_EXECUTOR_LISTEN | 127.0.0.1:50052 | where the executor listens |
| AGENTRUN_API_KEYS | (none) | tenant:key pairs, comma separated |
| AGENTRUN_API_KEYS_FILE | (none) | JSON file: {"tenant": ["key", "sha256:<hex>", ...], ...} |
| AGENTRUN_EVENT_RETENTION | 604800 (7 days) | seconds a run's event stream stays in JetStream |
| AGENTRUN_EVENT_STREAM_MAX_BYTES | 1073741824 (1 GiB) | bytes the run-events stream keeps; |
|   |   | beyond, its oldest messages are discarded (0: no limit) |
| AGENTRUN_EVENT_MAX_MESSAGE_BYTES | 1048576 (1 MiB) | the largest message of the run-events |
|   |   | stream (at least 65536); larger events are published in parts that fit |
| AGENTRUN_DEADLETTER_MAX_AGE | 2592000 (30 days) | seconds a dead letter is kept (0: forever) |
| AGENTRUN_DEADLETTER_MAX_BYTES | 67108864 (64 MiB) | bytes the dead-letter stream keeps; beyond, |
|   |   | its oldest records are discarded (0: no limit) |
| AGENTRUN_RUN_RETENTION | 2592000 (30 days) | seconds a finished run's events, snapshots and |
|   |   | run-list row stay in the store (then an executor prunes them); 0 keeps them |
| AGENTRUN_RETENTION_INTERVAL | 300 | seconds between an executor's prunes of finished runs |
| AGENTRUN_MAX_INPUT_BYTES | 65536 | the largest user input accepted |
| AGENTRUN_EXECUTOR_ID | (random) | this executor's name in logs and run records |
| AGENTRUN_LIVENESS_INTERVAL | 1.0 | seconds between watchers' checks that a run's executor lives |
| AGENTRUN_RECONCILE_INTERVAL | 5.0 | seconds between the executor's sweeps for lost runs |
| AGENTRUN_INTERNAL_PING_INTERVAL | 5.0 | seconds between a gateway's pings to its executors, and |
|   |   | how long one has to answer (the same on gateways and executors) |
| AGENTRUN_DISPATCH_ACK_WAIT | 1.5 | seconds after which a durable run whose executor stopped |
|   |   | keeping its dispatch message alive is given to another executor |
| AGENTRUN_DRAIN_GRACE | 10 | seconds a stopping executor gives its classic runs (and its open |
|   |   | calls) to end before they fail with EXECUTOR_LOST |
| AGENTRUN_MAX_DURABLE_RUNS | 256 | durable runs one executor holds at once (the rest wait queued; |
|   |   | 0: it takes none, and only serves the API) |
| AGENTRUN_MAX_STEP_ATTEMPTS | 5 | attempts of one durable step (each ended by its executor |
|   |   | stopping) after which the run fails with ATTEMPTS_EXHAUSTED and is dead-lettered |
| AGENTRUN_MAX_DISPATCH_FAILURES | 5 | deliveries of a durable run's dispatch message after which |
|   |   | a take-up that keeps failing (raising, not crashing) fails the run with |
|   |   | DISPATCH_FAILED and dead-letters it |
| AGENTRUN_TLS_CERT, AGENTRUN_TLS_KEY | (none) | the gateway serves TLS with these PEM files |
|   |   | (reread when they change) |
| AGENTRUN_TLS_CLIENT_CA | (none) | with TLS: the gateway requires client certificates of this CA |
| AGENTRUN_INTERNAL_TLS_CA, _CERT, _KEY | (none) | mTLS between gateways and executors: the |
|   |   | CA both trust, and this service's certificate and key |
| AGENTRUN_INTERNAL_TOKEN | (none) | a secret shared by gateways and executors (checked by |
|   |   | executors) |
| AGENTRUN_NATS_TLS_CA | (none) | the CA of NATS servers reached over TLS (tls:// URLs, or a |
|   |   | server that requires TLS); default: the system's CAs |
| AGENTRUN_NATS_TLS_CERT, _KEY | (none) | a client certificate, for NATS servers that verify |
|   |   | clients |
| AGENTRUN_REFLECTION | on | on or off: whether the service answers gRPC server reflection |
| AGENTRUN_TOOL_URL_ALLOW | (none: any) | hosts, host:port or CIDRs (comma separated) that agents' |
|   |   | tools may call; any other tool URL is refused at CreateAgent and at call time |
| AGENTRUN_MAX_TOOL_OUTPUT_BYTES | 65536 | a tool result longer than this is cut, with a marker |
| AGENTRUN_TENANT_MAX_CONCURRENT_RUNS | 0 (no limit) | runs of one tenant that may be running or |
|   |   | awaiting approval at once; a start beyond it is answered RESOURCE_EXHAUSTED |
| AGENTRUN_TENANT_RUNS_PER_MINUTE | 0 (no limit) | runs one tenant may start in any 60 s; a start |
|   |   | beyond it is answered RESOURCE_EXHAUSTED with the delay until it would be admitted |
| AGENTRUN_METRICS_LISTEN | (none: not served) | host:port where the service serves Prometheus |
|   |   | metrics (/metrics) |
| AGENTRUN_LOG_FORMAT | text | text or json (one JSON object a line); read by ``agentrun gateway`` |
|   |   | and ``agentrun executor`` (cli.serve) |

With no API keys configured, every caller is the tenant "local" (the embedded default).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.nats_link import NatsNames, StreamLimits
from common.quotas import TenantQuotas
from common.url_allow import UrlAllowList

LOCAL_TENANT = "local"


class ConfigurationError(ValueError):
    """Settings that a service cannot (or must not) start with; the message says why."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one side of a TLS connection: a certificate and its key, and the CA that
    the other side's certificate must come from (None: the other side needs none)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class ApiKeys:
    """Maps API keys to tenants. Keys are held only as SHA-256 digests."""

    digests: Mapping[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def tenant_of(self, key: str) -> str | None:
        return self.digests.get(hashlib.sha256(key.encode()).hexdigest())

    @staticmethod
    def parse(pairs: str, file: str | None) -> ApiKeys:
        digests: dict[str, str] = {}

        def add(tenant: object, key: object) -> None:
            if not isinstance(tenant, str) or not isinstance(key, str):
                raise ValueError("API key entries are text: a tenant and a key")
            tenant, key = tenant.strip(), key.strip()
            if not tenant or not key:
                raise ValueError("an API key entry needs a tenant and a key")
            if key.startswith("sha256:"):
                digest = key.removeprefix("sha256:").lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError("a sha256: key must be followed by 64 hex digits")
                digests[digest] = tenant
            else:
                digests[hashlib.sha256(key.encode()).hexdigest()] = tenant

        for pair in filter(None, (p.strip() for p in pairs.split(","))):
            tenant, sep, key = pair.partition(":")
            if not sep:
                raise ValueError("AGENTRUN_API_KEYS entries look like tenant:key")
            add(tenant, key)
        if file:
            data = json.loads(Path(file).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{file}: expected an object of tenant -> list of keys")
            for tenant, keys in data.items():
                if not isinstance(keys, (str, list)):
                    raise ValueError(f"{file}: the keys of {tenant!r} must be a list of text")
                for key in [keys] if isinstance(keys, str) else keys:
                    add(tenant, key)
        return ApiKeys(digests)


@dataclass(frozen=True)
class Settings:
    database_url: str = ""
    data_dir: Path = Path(".agentrun")
    nats_urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_names: NatsNames = field(default_factory=NatsNames)
    nats_replicas: int = 1
    executor_target: str = "127.0.0.1:50052"
    gateway_listen: str = "127.0.0.1:50051"
    executor_listen: str = "127.0.0.1:50052"
    api_keys: ApiKeys = ApiKeys()
    event_retention: float = 7 * 24 * 3600.0
    stream_limits: StreamLimits = field(default_factory=StreamLimits)
    run_retention: float = 30 * 24 * 3600.0
    retention_interval: float = 300.0
    max_input_bytes: int = 64 * 1024
    executor_id: str = ""
    liveness_interval: float = 1.0
    reconcile_interval: float = 5.0
    internal_ping_interval: float = 5.0
    drain_grace: float = 10.0
    dispatch_ack_wait: float = 1.5
    max_durable_runs: int = 256
    max_step_attempts: int = 5
    max_dispatch_failures: int = 5
    tool_url_allow: UrlAllowList = field(default_factory=UrlAllowList)
    max_tool_output_bytes: int = 64 * 1024
    # The gateway's public TLS (its ``ca``: the clients' CA, for mTLS), or plaintext.
    tls: TlsFiles | None = None
    # mTLS between gateways and executors (its ``ca``: the CA of both), or none.
    internal_tls: TlsFiles | None = None
    internal_token: str = ""
    reflection: bool = True
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    tenant_quotas: TenantQuotas = field(default_factory=TenantQuotas)
    metrics_listen: str = ""
    # Prompts, completions, tool arguments and results on spans (when traces are exported).
    trace_content: bool = False

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = Settings()
        limits = defaults.stream_limits

        def get(name: str, default: str) -> str:
            return env.get(f"AGENTRUN_{name}", "") or default

        return Settings(
            database_url=get("DATABASE_URL", ""),
            data_dir=Path(get("DATA_DIR", str(defaults.data_dir))),
            nats_urls=tuple(
                url
                for url in (
                    u.strip() for u in get("NATS_URL", ",".join(defaults.nats_urls)).split(",")
                )
                if url
            ),
            nats_names=NatsNames(get("NATS_NAMESPACE", defaults.nats_names.namespace)),
            nats_replicas=int(get("NATS_REPLICAS", str(defaults.nats_replicas))),
            executor_target=get("EXECUTOR_TARGET", defaults.executor_target),
            gateway_listen=get("GATEWAY_LISTEN", defaults.gateway_listen),
            executor_listen=get("EXECUTOR_LISTEN", defaults.executor_listen),
            api_keys=ApiKeys.parse(get("API_KEYS", ""), get("API_KEYS_FILE", "") or None),
            event_retention=float(get("EVENT_RETENTION", str(defaults.event_retention))),
            stream_limits=StreamLimits(
                events_max_bytes=int(get("EVENT_STREAM_MAX_BYTES", str(limits.events_max_bytes))),
                events_max_message_bytes=int(
                    get("EVENT_MAX_MESSAGE_BYTES", str(limits.events_max_message_bytes))
                ),
                deadletter_max_age=float(get("DEADLETTER_MAX_AGE", str(limits.deadletter_max_age))),
                deadletter_max_bytes=int(
                    get("DEADLETTER_MAX_BYTES", str(limits.deadletter_max_bytes))
                ),
            ),
            run_retention=float(get("RUN_RETENTION", str(defaults.run_retention))),
            retention_interval=float(get("RETENTION_INTERVAL", str(defaults.retention_interval))),
            max_input_bytes=int(get("MAX_INPUT_BYTES", str(defaults.max_input_bytes))),
            executor_id=get("EXECUTOR_ID", "") or f"executor-{uuid.uuid4().hex[:8]}",
            liveness_interval=float(get("LIVENESS_INTERVAL", str(defaults.liveness_interval))),
            reconcile_interval=float(get("RECONCILE_INTERVAL", str(defaults.reconcile_interval))),
            internal_ping_interval=_seconds(
                "INTERNAL_PING_INTERVAL",
                get("INTERNAL_PING_INTERVAL", str(defaults.internal_ping_interval)),
            ),
            drain_grace=_seconds(
                "DRAIN_GRACE", get("DRAIN_GRACE", str(defaults.drain_grace)), zero=True
            ),
            dispatch_ack_wait=float(get("DISPATCH_ACK_WAIT", str(defaults.dispatch_ack_wait))),
            max_durable_runs=int(get("MAX_DURABLE_RUNS", str(defaults.max_durable_runs))),
            max_step_attempts=int(get("MAX_STEP_ATTEMPTS", str(defaults.max_step_attempts))),
            max_dispatch_failures=int(
                get("MAX_DISPATCH_FAILURES", str(defaults.max_dispatch_failures))
            ),
            tool_url_allow=_tool_url_allow(get("TOOL_URL_ALLOW", "")),
            max_tool_output_bytes=int(
                get("MAX_TOOL_OUTPUT_BYTES", str(defaults.max_tool_output_bytes))
            ),
            tls=_public_tls(get("TLS_CERT", ""), get("TLS_KEY", ""), get("TLS_CLIENT_CA", "")),
            internal_tls=_internal_tls(
                get("INTERNAL_TLS_CA", ""),
                get("INTERNAL_TLS_CERT", ""),
                get("INTERNAL_TLS_KEY", ""),
            ),
            internal_token=get("INTERNAL_TOKEN", ""),
            reflection=_on_off("REFLECTION", get("REFLECTION", "on")),
            **_nats_tls(get("NATS_TLS_CA", ""), get("NATS_TLS_CERT", ""), get("NATS_TLS_KEY", "")),
            tenant_quotas=TenantQuotas(
                max_concurrent_runs=_count(get("TENANT_MAX_CONCURRENT_RUNS", "0")),
                runs_per_minute=_count(get("TENANT_RUNS_PER_MINUTE", "0")),
            ),
            metrics_listen=_host_port("METRICS_LISTEN", get("METRICS_LISTEN", "")),
            trace_content=_on_off("TRACE_CONTENT", get("TRACE_CONTENT", "off")),
        )

    @property
    def nats_tls(self) -> bool:
        """Whether NATS connections need TLS settings of their own (else: nats-py's defaults,
        the system's CAs, for tls:// URLs)."""
        return any((self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key))


def _nats_tls(ca: str, cert: str, key: str) -> dict[str, Path | None]:
    if bool(cert) != bool(key):
        raise ConfigurationError("AGENTRUN_NATS_TLS_CERT and AGENTRUN_NATS_TLS_KEY go together")
    return {
        "nats_tls_ca": Path(ca) if ca else None,
        "nats_tls_cert": Path(cert) if cert else None,
        "nats_tls_key": Path(key) if key else None,
    }


def _public_tls(cert: str, key: str, client_ca: str) -> TlsFiles | None:
    if not cert and not key:
        if client_ca:
            raise ConfigurationError("AGENTRUN_TLS_CLIENT_CA needs AGENTRUN_TLS_CERT and _KEY")
        return None
    if not cert or not key:
        raise ConfigurationError("AGENTRUN_TLS_CERT and AGENTRUN_TLS_KEY go together")
    return TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def _internal_tls(ca: str, cert: str, key: str) -> TlsFiles | None:
    given = [bool(ca), bool(cert), bool(key)]
    if not any(given):
        return None
    if not all(given):
        raise ConfigurationError(
            "internal mTLS needs all of AGENTRUN_INTERNAL_TLS_CA, _CERT and _KEY"
        )
    return TlsFiles(Path(cert), Path(key), Path(ca))


def _tool_url_allow(text: str) -> UrlAllowList:
    try:
        return UrlAllowList.parse(text)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _on_off(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ConfigurationError(f"AGENTRUN_{name} is on or off, not {value!r}")


def _host_port(name: str, value: str) -> str:
    value = value.strip()
    if value and not value.rpartition(":")[2].isdigit():
        raise ConfigurationError(f"AGENTRUN_{name} is host:port, not {value!r}")
    return value


def _seconds(name: str, value: str, *, zero: bool = False) -> float:
    seconds = float(value)
    if not (seconds >= 0 if zero else seconds > 0):
        bound = "0 or more" if zero else "above 0"
        raise ConfigurationError(f"AGENTRUN_{name} is a number of seconds {bound}, not {value!r}")
    return seconds


def _count(value: str) -> int:
    count = int(value)
    if count < 0:
        raise ValueError(f"a limit is a count (0: no limit), not {value}")
    return count
