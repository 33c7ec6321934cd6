"""The tools of an agent: kinds in the API and in the store, and what validation refuses (each
failure naming its field). What a gateway answers is in tests/test_http_tools.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import json_format

from agentrun.v1 import agent_pb2
from common.errors import InvalidArgument
from common.settings import ConfigurationError, Settings
from common.url_allow import UrlAllowList
from eventstore.agent_config import AgentConfig, HttpToolSettings, ModelSettings, ToolSettings
from eventstore.retry_policy import RetryPolicy
from executor.extensions import load_extensions
from executor.translation import agent_from_proto, agent_to_proto

load_extensions()

WEATHER = HttpToolSettings(
    url="https://weather.example.com/v1/now",
    description="The weather now in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 80}},
        "required": ["city"],
    },
    headers_from_env={"Authorization": "WEATHER_AUTH"},
)


def http_tool(name: str = "weather", **changes: Any) -> ToolSettings:
    return ToolSettings(name=name, kind="http", http=replace(WEATHER, **changes))


def agent(*tools: ToolSettings) -> AgentConfig:
    return AgentConfig(agent_id="helper", model=ModelSettings(provider="scripted"), tools=tools)


def refused(config: AgentConfig) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        config.validate()
    return caught.value


def test_an_http_tool_round_trips_through_the_api_and_the_store() -> None:
    tool = replace(http_tool(), requires_approval=True, retry_policy=RetryPolicy(4, 0.5, 3.0, 5.0))
    config = agent(ToolSettings(name="clock"), tool)
    config.validate()
    assert AgentConfig.from_json(config.to_json()) == config
    proto = agent_to_proto(config)
    assert proto.tools[1].WhichOneof("kind") == "http"
    assert json_format.MessageToDict(proto.tools[1].http.parameters) == WEATHER.parameters
    again = agent_from_proto(proto)
    assert again.tools == config.tools
    # Whole numbers come back as integers (a Struct holds doubles).
    assert type(again.tools[1].http.parameters["properties"]["city"]["maxLength"]) is int  # type: ignore[union-attr]


def test_a_tool_stored_before_the_kinds_is_a_builtin() -> None:
    stored = agent().to_json()
    stored["tools"] = [{"name": "clock", "description": "", "requires_approval": False}]
    config = AgentConfig.from_json(stored)
    assert config.tools == (ToolSettings(name="clock"),)
    assert config.tool_retry_policy_of(config.tools[0]) == config.tool_retry_policy


def test_a_builtin_by_name_or_by_kind_is_the_same_tool() -> None:
    by_name = agent_pb2.Tool(name="clock")
    by_kind = agent_pb2.Tool(builtin=agent_pb2.BuiltinTool(name="clock"))
    for tool in (by_name, by_kind):
        config = agent_from_proto(agent_pb2.Agent(id="helper", tools=[tool]))
        assert config.tools == (ToolSettings(name="clock"),)
    both = agent_pb2.Tool(name="calculator", builtin=agent_pb2.BuiltinTool(name="clock"))
    with pytest.raises(InvalidArgument) as caught:
        agent_from_proto(agent_pb2.Agent(id="helper", tools=[both]))
    assert caught.value.field == "agent.tools[0].name"


def test_a_client_tool_round_trips() -> None:
    tool = agent_pb2.Tool(
        client=agent_pb2.ClientTool(name="pick_file", description="Asks the user for a file.")
    )
    tool.client.parameters.update({"type": "object", "properties": {"kind": {"type": "string"}}})
    model = agent_pb2.ModelConfig(provider="scripted")
    config = agent_from_proto(agent_pb2.Agent(id="helper", model=model, tools=[tool]))
    config.validate()
    (settings,) = config.tools
    assert (settings.name, settings.kind) == ("pick_file", "client")
    assert settings.schema == {"type": "object", "properties": {"kind": {"type": "string"}}}
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("client", "field"),
    [
        (agent_pb2.ClientTool(name="pick_file"), "client.description"),
        (agent_pb2.ClientTool(name="pick file", description="d"), "client.name"),
    ],
)
def test_a_client_tool_is_validated(client: agent_pb2.ClientTool, field: str) -> None:
    model = agent_pb2.ModelConfig(provider="scripted")
    proto = agent_pb2.Agent(id="helper", model=model, tools=[agent_pb2.Tool(client=client)])
    with pytest.raises(InvalidArgument) as caught:
        agent_from_proto(proto).validate()
    assert caught.value.field == f"agent.tools[0].{field}"


@pytest.mark.parametrize(
    ("tools", "field", "words"),
    [
        ((http_tool(), http_tool()), "agent.tools[1].http.name", "already the name of"),
        ((ToolSettings(name="clock"), http_tool("clock")), "agent.tools[1].http.name", "already"),
        ((http_tool("bad name"),), "agent.tools[0].http.name", "1-64 characters"),
        ((http_tool("x" * 65),), "agent.tools[0].http.name", "1-64 characters"),
        ((http_tool(url="ftp://example.com/x"),), "agent.tools[0].http.url", "http or https"),
        ((http_tool(url="file:///etc/passwd"),), "agent.tools[0].http.url", "http or https"),
        ((http_tool(url="https:///nohost"),), "agent.tools[0].http.url", "host"),
        ((http_tool(url="http://a:b@example.com/"),), "agent.tools[0].http.url", "credentials"),
        ((http_tool(url="http://example.com:99999/"),), "agent.tools[0].http.url", "not a URL"),
        ((http_tool(description=" "),), "agent.tools[0].http.description", "required"),
        (
            (http_tool(parameters={"type": "object", "properties": {"a": {"type": "strang"}}}),),
            "agent.tools[0].http.parameters",
            "not a valid JSON Schema",
        ),
        (
            (http_tool(parameters={"type": "object", "required": "city"}),),
            "agent.tools[0].http.parameters",
            "not a valid JSON Schema",
        ),
        (
            (http_tool(parameters={"type": "string"}),),
            "agent.tools[0].http.parameters",
            "must describe an object",
        ),
        (
            (http_tool(headers_from_env={"Idempotency-Key": "K"}),),
            "agent.tools[0].http.headers_from_env",
            "set by the executor",
        ),
        (
            (http_tool(headers_from_env={"X-Key": "not a name"}),),
            "agent.tools[0].http.headers_from_env[X-Key]",
            "environment variable",
        ),
        (
            (replace(http_tool(), retry_policy=RetryPolicy(maximum_attempts=0)),),
            "agent.tools[0].retry_policy.maximum_attempts",
            "between 1 and 100",
        ),
    ],
)
def test_what_validation_refuses_names_its_field(
    tools: tuple[ToolSettings, ...], field: str, words: str
) -> None:
    error = refused(agent(*tools))
    assert error.field == field
    assert words in error.description


def test_an_empty_schema_means_any_object() -> None:
    agent(http_tool(parameters={})).validate()


@pytest.mark.parametrize(
    ("allow", "url", "allowed"),
    [
        ("", "http://10.0.0.1/", True),
        ("example.com", "https://example.com/x", True),
        ("example.com", "https://EXAMPLE.com:8443/x", True),
        ("example.com", "https://example.com.evil.net/", False),
        ("127.0.0.1:8080", "http://127.0.0.1:8080/", True),
        ("127.0.0.1:8080", "http://127.0.0.1:8081/", False),
        ("example.com:443", "https://example.com/", True),
        ("10.0.0.0/8, 192.168.1.1", "http://10.9.8.7/", True),
        ("10.0.0.0/8", "http://169.254.169.254/", False),
        ("10.0.0.0/8", "http://internal.example/", False),  # names are never resolved
        ("[::1]:9000", "http://[::1]:9000/", True),
    ],
)
def test_the_url_allow_list(allow: str, url: str, allowed: bool) -> None:
    assert UrlAllowList.parse(allow).allows(url) is allowed


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "http://example.com", "example.com:port"])
def test_a_malformed_allow_list_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="AGENTRUN_TOOL_URL_ALLOW"):
        UrlAllowList.parse(entry)


def test_the_settings_read_the_tool_settings() -> None:
    settings = Settings.from_env(
        {
            "AGENTRUN_TOOL_URL_ALLOW": "example.com, 10.0.0.0/8",
            "AGENTRUN_MAX_TOOL_OUTPUT_BYTES": "9",
        }
    )
    assert settings.tool_url_allow.allows("http://10.1.1.1/x")
    assert not settings.tool_url_allow.allows("http://192.168.1.1/x")
    assert settings.max_tool_output_bytes == 9
    defaults = Settings.from_env({})
    assert not defaults.tool_url_allow.restricts
    assert defaults.max_tool_output_bytes == 65536
    with pytest.raises(ConfigurationError, match="AGENTRUN_TOOL_URL_ALLOW"):
        Settings.from_env({"AGENTRUN_TOOL_URL_ALLOW": "10.0.0.0/33"})
