"""A real agentrun stack for tests: executor and gateway processes against one store and NATS."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cli.launcher import Service, start_agentrun


@dataclass
class Stack:
    database_url: str
    nats: Service
    tmp: Path
    executors: list[Service] = field(default_factory=list)
    gateways: list[Service] = field(default_factory=list)
    # Stacks of one test session share a nats-server: each keeps to a namespace of its own.
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}")
    _count: int = 0

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "AGENTRUN_DATABASE_URL": self.database_url,
            "AGENTRUN_DATA_DIR": str(self.data_dir),
            "AGENTRUN_NATS_URL": f"nats://{self.nats.address}",
            "AGENTRUN_NATS_NAMESPACE": self.namespace,
            "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
            "AGENTRUN_GATEWAY_LISTEN": "127.0.0.1:0",
            "AGENTRUN_LIVENESS_INTERVAL": "0.5",
            "AGENTRUN_RECONCILE_INTERVAL": "1",
            "AGENTRUN_LOG_LEVEL": "INFO",
            **overrides,
        }

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}-{self._count}"

    def start_executor(self, **env: str) -> Service:
        service = start_agentrun(
            "executor", self.env(**env), self.tmp / "logs", self._name("executor")
        )
        self.executors.append(service)
        return service

    def start_gateway(self, executor_target: str | None = None, **env: str) -> Service:
        target = executor_target or ",".join(e.address for e in self.executors)
        service = start_agentrun(
            "gateway",
            self.env(AGENTRUN_EXECUTOR_TARGET=target, **env),
            self.tmp / "logs",
            self._name("gateway"),
        )
        self.gateways.append(service)
        return service

    def stop(self) -> None:
        for service in [*self.gateways, *self.executors]:
            service.stop()


def start_stack(
    database_url: str, nats: Service, tmp: Path, *, executors: int = 1, gateways: int = 1
) -> Stack:
    stack = Stack(database_url=database_url, nats=nats, tmp=tmp)
    try:
        for _ in range(executors):
            stack.start_executor()
        for _ in range(gateways):
            stack.start_gateway()
    except BaseException:
        stack.stop()
        raise
    return stack
