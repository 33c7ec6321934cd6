"""Tools the client executes: the model is offered them like any tool, but the agent loop never
invokes one. The run's state machine hands such a call to the client (eventstore.run_steps:
HandToClient) and the run waits for the result the client submits (a SubmitResult command)."""

from __future__ import annotations

from typing import Any

from eventstore.agent_config import ClientToolSettings, ToolSettings
from executor.tools.base import ToolContext, ToolError, ToolRuntime, register_kind


class ClientTool:
    """What the model is offered of one agent's client tool settings."""

    def __init__(self, settings: ToolSettings, runtime: ToolRuntime) -> None:
        assert settings.client is not None  # (validated with the agent)
        self._settings: ClientToolSettings = settings.client
        self._name = settings.name

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._settings.description

    @property
    def parameters(self) -> dict[str, Any]:
        return self._settings.parameters or {"type": "object"}

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str:
        raise ToolError(f"{self._name!r} is executed by the client, not by the executor")


register_kind("client", ClientTool)
