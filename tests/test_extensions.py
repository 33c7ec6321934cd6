"""The open seams: model providers and tools register themselves, the domain validates agents
against what is registered, and the executor registers exactly what it ships at startup."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from dataclasses import replace

import grpc
import pytest

from agentrun.v1 import agent_pb2
from common.errors import InvalidArgument
from eventstore.agent_config import AgentConfig, ModelSettings, ToolSettings
from eventstore.extensions import MODEL_PROVIDERS, TOOLS, Registry
from executor.models import ModelProviders
from executor.models.base import FACTORIES
from executor.models.openai import OpenAIProvider
from executor.models.scripted import ScriptedProvider
from executor.tools.base import TOOLS as TOOL_IMPLEMENTATIONS
from tests.client import Client

SHIPPED_PROVIDERS = ("openai", "scripted")
SHIPPED_TOOLS = ("calculator", "clock", "send_email")
AGENT = AgentConfig(agent_id="a", model=ModelSettings(provider="scripted"))


def test_the_registered_providers_and_tools_are_exactly_the_shipped_ones() -> None:
    assert MODEL_PROVIDERS.names == SHIPPED_PROVIDERS
    assert TOOLS.names == SHIPPED_TOOLS
    assert tuple(sorted(FACTORIES)) == SHIPPED_PROVIDERS
    assert tuple(sorted(TOOL_IMPLEMENTATIONS)) == SHIPPED_TOOLS
    models = ModelProviders()
    assert models.names == SHIPPED_PROVIDERS
    assert isinstance(models.get("openai"), OpenAIProvider)
    assert isinstance(models.get("scripted"), ScriptedProvider)


def test_an_agent_naming_an_unregistered_provider_or_tool_is_refused() -> None:
    with pytest.raises(InvalidArgument) as provider:
        replace(AGENT, model=ModelSettings(provider="anthropic")).validate()
    assert provider.value.field == "agent.model.provider"
    assert "registered: openai, scripted" in provider.value.message
    with pytest.raises(InvalidArgument) as tool:
        replace(AGENT, tools=(ToolSettings("clock"), ToolSettings("rm_rf"))).validate()
    assert tool.value.field == "agent.tools"
    assert "'rm_rf'" in tool.value.message
    assert "registered: calculator, clock, send_email" in tool.value.message
    replace(AGENT, tools=tuple(ToolSettings(name) for name in SHIPPED_TOOLS)).validate()


def test_a_provider_checks_its_own_settings() -> None:
    unnamed = replace(AGENT, model=ModelSettings(provider="openai"))
    with pytest.raises(InvalidArgument) as error:
        unnamed.validate()
    assert error.value.field == "agent.model.name"
    replace(AGENT, model=ModelSettings(provider="openai", name="gpt-4o-mini")).validate()


def test_a_registry_keeps_one_extension_per_name() -> None:
    registry: Registry[str] = Registry("gadget", "agent.gadget")
    with pytest.raises(RuntimeError, match="no gadget is registered"):
        registry.validate("a", "")

    def check(settings: str) -> None:
        if settings != "ok":
            raise InvalidArgument("agent.gadget.settings", "must be ok")

    registry.register("b", check)
    registry.register("a")
    registry.register("b", check)  # the same again (a module imported twice): no change
    with pytest.raises(ValueError, match="another gadget is registered as 'b'"):
        registry.register("b")
    assert registry.names == ("a", "b")
    registry.validate("a", "anything")
    registry.validate("b", "ok")
    with pytest.raises(InvalidArgument, match="must be ok"):
        registry.validate("b", "not ok")
    with pytest.raises(InvalidArgument, match="unknown gadget 'c'; registered: a, b"):
        registry.validate("c", "ok")


def test_nothing_is_registered_until_the_executors_extensions_are_loaded() -> None:
    """In a fresh interpreter: validating before loading is a programming error, not a refused
    agent; loading registers the shipped providers and tools (once, however often it runs)."""
    program = textwrap.dedent(
        """
        from eventstore.agent_config import AgentConfig, ModelSettings
        from eventstore.extensions import MODEL_PROVIDERS, TOOLS
        from executor.extensions import load_extensions
        agent = AgentConfig(agent_id="a", model=ModelSettings(provider="scripted"))
        try:
            agent.validate()
        except RuntimeError as error:
            print("refused:", error)
        load_extensions()
        load_extensions()
        agent.validate()
        print(",".join(MODEL_PROVIDERS.names), ",".join(TOOLS.names))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.splitlines() == [
        "refused: no model provider is registered: load them before validating",
        "openai,scripted calculator,clock,send_email",
    ]


async def test_a_running_executor_validates_agents_against_its_registries(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    ids = [f"seams-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    refused = {
        "agent.model.provider": agent_pb2.ModelConfig(provider="anthropic"),
        "agent.model.name": agent_pb2.ModelConfig(provider="openai"),
    }
    for field, model in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.create_agent(agent_pb2.Agent(id=ids[0], model=model))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(field)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.create_agent(
            agent_pb2.Agent(
                id=ids[1],
                model=agent_pb2.ModelConfig(provider="scripted"),
                tools=[agent_pb2.Tool(name="clock"), agent_pb2.Tool(name="web_search")],
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown tool 'web_search'" in (caught.value.details() or "")
    created = await client.create_agent(
        agent_pb2.Agent(
            id=ids[2],
            model=agent_pb2.ModelConfig(provider="openai", name="gpt-4o-mini"),
            tools=[agent_pb2.Tool(name=name) for name in SHIPPED_TOOLS],
        )
    )
    assert created.version == 1
