"""An agent's MCP servers in the API and in the store (what a run does with them is in
tests/test_mcp_tools.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

from eventstore.agent_config import AgentConfig, McpServerSettings, ModelSettings, ToolSettings
from eventstore.retry_policy import RetryPolicy
from executor.extensions import load_extensions
from executor.translation import agent_from_proto, agent_to_proto

load_extensions()

CRM = McpServerSettings(
    url="https://crm.example.com/mcp",
    headers_from_env={"Authorization": "CRM_AUTH"},
    tool_names=("find_customer", "open_ticket"),
    name_prefix="crm_",
)


def mcp_server(**changes: object) -> ToolSettings:
    return ToolSettings(name="", kind="mcp", mcp=replace(CRM, **changes))  # type: ignore[arg-type]


def test_mcp_servers_round_trip_through_the_api_and_the_store() -> None:
    first = replace(
        mcp_server(), requires_approval=True, retry_policy=RetryPolicy(3, 0.5, 2.0, 5.0)
    )
    second = mcp_server(url="http://127.0.0.1:9000/mcp", tool_names=(), name_prefix="")
    config = AgentConfig(
        agent_id="helper",
        model=ModelSettings(provider="scripted"),
        tools=(ToolSettings(name="clock"), first, second),
    )
    config.validate()  # (two servers: neither has a name of its own to clash)
    assert AgentConfig.from_json(config.to_json()) == config
    proto = agent_to_proto(config)
    assert [t.WhichOneof("kind") for t in proto.tools] == [None, "mcp", "mcp"]
    assert list(proto.tools[1].mcp.tool_names) == ["find_customer", "open_ticket"]
    assert agent_from_proto(proto).tools == config.tools
    assert config.tool("") is None  # (the model cannot call a server by its empty name)
    assert [i for i, _ in config.mcp_servers] == [1, 2]


def printed_by(probe: str) -> str:
    """What ``probe`` prints, run in a fresh interpreter (its imports are its own)."""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_an_executor_starts_without_importing_the_mcp_sdk() -> None:
    """The SDK takes longer to import than the rest of an executor: it comes with the first
    agent that uses an MCP server, not with every executor's start."""
    probe = (
        "import sys, executor.server, cli.serve\n"
        "from executor.extensions import load_extensions\n"
        "load_extensions()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mcp', 'mcp_types', 'pydantic'}))"
    )
    assert printed_by(probe) == "[]"


def test_the_mcp_sdk_is_imported_off_the_event_loop() -> None:
    """Its first use imports the SDK in a worker thread: every run on the executor goes on
    while it loads (seconds on a loaded machine)."""
    probe = (
        "import asyncio, sys, threading\n"
        "on_main = set()\n"
        "def hook(event, args):\n"
        "    if event == 'import' and str(args[0]).split('.')[0] == 'mcp':\n"
        "        if threading.current_thread() is threading.main_thread():\n"
        "            on_main.add(args[0])\n"
        "sys.addaudithook(hook)\n"
        "from executor.tools.mcp_sessions import load_sdk\n"
        "asyncio.run(load_sdk())\n"
        "print(sorted(on_main), 'mcp.client.session' in sys.modules)"
    )
    assert printed_by(probe) == "[] True"
