"""The ``agentrun`` command line as a real subprocess against a real gateway: chat and runs.

Every command runs as ``python -m cli.main ...`` with its stdin piped, against the first
gateway of the ``stack`` fixture. Timeouts only bound a hang; they never assert timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.chat import PROMPT
from cli.launcher import free_port
from executor.tools.send_email import read_outbox
from tests.client import Client, rest, scripted_agent, until
from tests.stack import Stack

GUARD = 120.0  # seconds; only bounds a hung command so that it fails instead of stalling CI


def cli_env() -> dict[str, str]:
    """The test's environment without settings that would steer the CLI elsewhere."""
    return {
        **{k: v for k, v in os.environ.items() if k not in ("AGENTRUN_TARGET", "AGENTRUN_API_KEY")},
        "PYTHONUNBUFFERED": "1",
    }


async def agentrun(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Runs ``agentrun <args> --target <first gateway>`` to its end with ``stdin`` piped in."""
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        *args,
        "--target",
        stack.gateways[0].address,
    ]
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=cli_env(),
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"


async def runs_of(client: Client, agent_id: str) -> list[run_pb2.Run]:
    response = await client.runs.ListRuns(run_service_pb2.ListRunsRequest(agent_id=agent_id))
    runs: list[run_pb2.Run] = list(response.runs)
    return runs


async def finished_run(client: Client, text: str = "count to 3") -> tuple[str, str]:
    """(agent id, run id) of a completed classic run of a demo-behaviour agent."""
    agent = await client.create_agent(scripted_agent())
    events = await client.run(agent.id, text)
    assert events[-1].HasField("run_completed"), events[-1]
    return agent.id, events[0].run_id


# --- chat ---------------------------------------------------------------------------------


async def test_chat_second_turn_sees_the_first(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(stack, "chat", "--agent", agent.id, stdin="My name is Ada\nrecall\n")
    assert result.returncode == 0, explain(result)
    assert 'Earlier in this conversation you said: "My name is Ada".' in result.stdout, explain(
        result
    )
    # The first turn got the ordinary demo reply, quoting its input.
    assert 'You said: "My name is Ada". This is turn 1' in result.stdout, explain(result)
    # Both turns are runs of one conversation, named on stderr for --conversation.
    runs = await runs_of(client, agent.id)
    assert sorted(r.input for r in runs) == ["My name is Ada", "recall"]
    assert all(r.status == run_pb2.RUN_STATUS_COMPLETED for r in runs)
    conversation_ids = {r.conversation_id for r in runs}
    assert len(conversation_ids) == 1
    (conversation_id,) = conversation_ids
    assert conversation_id
    assert f"--conversation {conversation_id}" in result.stderr, explain(result)


async def test_chat_continues_a_conversation_given_on_the_command_line(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    first = await agentrun(stack, "chat", "--agent", agent.id, stdin="I like tea\n")
    assert first.returncode == 0, explain(first)
    (run,) = await runs_of(client, agent.id)
    second = await agentrun(
        stack,
        "chat",
        "--agent",
        agent.id,
        "--conversation",
        run.conversation_id,
        stdin="recall\n",
    )
    assert second.returncode == 0, explain(second)
    assert 'you said: "I like tea".' in second.stdout, explain(second)


async def test_chat_approval_yes_sends_the_email(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(
        stack, "chat", "--agent", agent.id, stdin="please email bob@example.com\ny\n"
    )
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "I will email bob@example.com." in out, explain(result)
    question = re.search(r"\? send_email wants to run with (\{.*?\}) — approve\? \[y/n\] ", out)
    assert question is not None, explain(result)
    assert json.loads(question.group(1))["to"] == "bob@example.com"
    assert "✓ send_email approved" in out, explain(result)
    assert "← send_email: " in out, explain(result)
    assert "Done: the email to bob@example.com was sent." in out, explain(result)
    # The question comes before the confirmation, the confirmation before the final answer.
    assert (
        out.index(question.group(0))
        < out.index("✓ send_email approved")
        < out.index("Done: the email to bob@example.com was sent.")
    )
    (run,) = await runs_of(client, agent.id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    sent = [m for m in read_outbox(stack.data_dir) if m["run_id"] == run.id]
    assert [m["to"] for m in sent] == ["bob@example.com"]


async def test_chat_approval_no_tells_the_model_it_did_not_succeed(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(stack, "chat", "--agent", agent.id, stdin="email bob@example.com\nn\n")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "? send_email wants to run with" in out, explain(result)
    assert "✗ send_email denied" in out, explain(result)
    assert "The send_email call did not succeed" in out, explain(result)
    assert "was sent" not in out, explain(result)
    (run,) = await runs_of(client, agent.id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.output.startswith("The send_email call did not succeed")
    assert not [m for m in read_outbox(stack.data_dir) if m["run_id"] == run.id]


async def test_chat_asks_again_after_an_answer_that_is_neither_yes_nor_no(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(
        stack, "chat", "--agent", agent.id, stdin="email bob@example.com\nmaybe\nyes\n"
    )
    assert result.returncode == 0, explain(result)
    assert result.stdout.count("— approve? [y/n] ") == 2, explain(result)
    assert "Done: the email to bob@example.com was sent." in result.stdout, explain(result)


async def test_chat_end_of_input_at_an_approval_denies_the_call(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(stack, "chat", "--agent", agent.id, stdin="email bob@example.com\n")
    assert result.returncode == 0, explain(result)
    assert "no answer (end of input): denying the tool call" in result.stderr, explain(result)
    assert "The send_email call did not succeed" in result.stdout, explain(result)
    (run,) = await runs_of(client, agent.id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert not [m for m in read_outbox(stack.data_dir) if m["run_id"] == run.id]


async def test_chat_quit_command_ends_the_chat_before_later_lines(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(stack, "chat", "--agent", agent.id, stdin="count to 2\n/quit\nhello\n")
    assert result.returncode == 0, explain(result)
    assert "1 2" in result.stdout, explain(result)
    assert [r.input for r in await runs_of(client, agent.id)] == ["count to 2"]


async def test_chat_with_an_unknown_agent_reports_not_found_and_goes_on(stack: Stack) -> None:
    result = await agentrun(stack, "chat", "--agent", "no-such-agent", stdin="hello\n")
    assert result.returncode == 0, explain(result)
    assert "error: NOT_FOUND" in result.stderr, explain(result)


# --- runs ---------------------------------------------------------------------------------


async def test_runs_list_shows_the_agents_runs(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    agent_id, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "list", "--agent", agent_id)
    assert result.returncode == 0, explain(result)
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["RUN", "STATUS", "AGENT", "CREATED", "INPUT"]
    assert len(lines) == 1, explain(result)
    assert lines[0].split()[:3] == [run_id, "COMPLETED", agent_id]
    assert lines[0].endswith("count to 3")


async def test_runs_list_json_is_one_run_object_per_line(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent_id, first = await finished_run(client)
    second = (await client.run(agent_id, "count to 2"))[0].run_id
    result = await agentrun(stack, "runs", "list", "--agent", agent_id, "--json")
    assert result.returncode == 0, explain(result)
    runs: list[Any] = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in runs] == [second, first]  # newest first
    assert {r["status"] for r in runs} == {"RUN_STATUS_COMPLETED"}
    assert {r["agentId"] for r in runs} == {agent_id}
    assert [r["output"] for r in runs] == ["1 2", "1 2 3"]


async def test_runs_list_limit_and_no_runs(stack: Stack, channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent_id, _ = await finished_run(client)
    newest = (await client.run(agent_id, "count to 2"))[0].run_id
    limited = await agentrun(stack, "runs", "list", "--agent", agent_id, "--limit", "1", "--json")
    assert limited.returncode == 0, explain(limited)
    assert [json.loads(line)["id"] for line in limited.stdout.splitlines()] == [newest]
    empty = await agentrun(stack, "runs", "list", "--agent", f"nobody-{uuid.uuid4().hex[:8]}")
    assert empty.returncode == 0, explain(empty)
    assert empty.stdout == ""
    assert "no runs" in empty.stderr


async def test_runs_show_prints_the_run(stack: Stack, channels: list[grpc.aio.Channel]) -> None:
    agent_id, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "show", run_id)
    assert result.returncode == 0, explain(result)
    rows = {
        label.strip(): value.strip()
        for label, _, value in (line.partition(":") for line in result.stdout.splitlines())
    }
    assert rows["run"] == run_id
    assert rows["status"] == "COMPLETED"
    assert rows["agent"] == f"{agent_id} (version 1)"
    assert rows["mode"] == "CLASSIC"
    assert rows["input"] == "count to 3"
    assert rows["output"] == "1 2 3"


async def test_runs_show_json_parses_as_the_run(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    agent_id, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "show", run_id, "--json")
    assert result.returncode == 0, explain(result)
    run = json.loads(result.stdout)
    assert run["id"] == run_id
    assert run["agentId"] == agent_id
    assert run["status"] == "RUN_STATUS_COMPLETED"
    assert run["executionMode"] == "EXECUTION_MODE_CLASSIC"
    assert run["input"] == "count to 3"
    assert run["output"] == "1 2 3"


async def test_runs_watch_of_a_finished_run_prints_the_final_text(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    agent_id, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "watch", run_id)
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"[run {run_id} started: agent {agent_id}, CLASSIC]", explain(result)
    assert "1 2 3" in lines, explain(result)
    assert lines[-1].startswith("[completed: "), explain(result)


async def test_runs_watch_json_is_one_event_per_line(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    _, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "watch", run_id, "--json")
    assert result.returncode == 0, explain(result)
    events: list[Any] = [json.loads(line) for line in result.stdout.splitlines()]
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert {e["runId"] for e in events} == {run_id}
    assert "runStarted" in events[0]
    assert events[-1]["runCompleted"]["output"] == "1 2 3"
    text = "".join(e["textDelta"]["text"] for e in events if "textDelta" in e)
    assert text == "1 2 3"


async def test_runs_watch_after_a_sequence_skips_earlier_events(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    _, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "watch", run_id, "--after", "1", "--json")
    assert result.returncode == 0, explain(result)
    events: list[Any] = [json.loads(line) for line in result.stdout.splitlines()]
    assert int(events[0]["sequence"]) == 2
    assert "runCompleted" in events[-1]


async def test_runs_show_of_an_unknown_run_exits_1_with_not_found(stack: Stack) -> None:
    result = await agentrun(stack, "runs", "show", str(uuid.uuid4()))
    assert result.returncode == 1, explain(result)
    assert result.stdout == ""
    assert "NOT_FOUND" in result.stderr, explain(result)
    assert result.stderr.startswith("error: NOT_FOUND: "), explain(result)


async def test_runs_watch_of_an_unknown_run_exits_1_with_not_found(stack: Stack) -> None:
    result = await agentrun(stack, "runs", "watch", str(uuid.uuid4()))
    assert result.returncode == 1, explain(result)
    assert "error: NOT_FOUND: " in result.stderr, explain(result)


async def test_runs_replay_of_a_classic_run_exits_1_with_failed_precondition(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    _, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "replay", run_id)
    assert result.returncode == 1, explain(result)
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("error: FAILED_PRECONDITION: "), explain(result)
    assert "durable run" in message
    assert "classic run" in message
    assert "\n" not in message  # one clear line, no traceback


async def test_runs_fork_of_a_classic_run_exits_1_with_failed_precondition(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    _, run_id = await finished_run(Client(channels[0]))
    result = await agentrun(stack, "runs", "fork", run_id, "--at", "0")
    assert result.returncode == 1, explain(result)
    assert result.stderr.startswith("error: FAILED_PRECONDITION: "), explain(result)


async def test_a_bad_command_line_exits_2_with_usage(stack: Stack) -> None:
    result = await agentrun(stack, "runs", "list", "--limit", "0")
    assert result.returncode == 2, explain(result)
    assert "must be at least 1" in result.stderr, explain(result)


async def test_an_unreachable_gateway_is_an_error_not_a_traceback() -> None:
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        "runs",
        "show",
        str(uuid.uuid4()),
        "--target",
        f"127.0.0.1:{free_port()}",
    ]
    result = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=GUARD, env=cli_env()
    )
    assert result.returncode == 1, explain(result)
    assert result.stderr.startswith("error: UNAVAILABLE: "), explain(result)
    assert "Traceback" not in result.stderr


# --- live output and Ctrl-C ---------------------------------------------------------------


class Live:
    """A CLI process whose output the test reads as it comes, with its stdin kept open."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out = ""
        self._seen = 0

    @staticmethod
    async def start(stack: Stack, *args: str) -> Live:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            *args,
            "--target",
            stack.gateways[0].address,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        return Live(process)

    async def write(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        await self.process.stdin.drain()

    async def until(self, text: str) -> None:
        """Reads stdout until ``text`` appears after whatever the previous call waited for."""
        assert self.process.stdout is not None
        while (found := self.out.find(text, self._seen)) < 0:
            chunk = await asyncio.wait_for(self.process.stdout.read(4096), GUARD)
            assert chunk, f"stdout ended without {text!r}:\n{self.out}"
            self.out += chunk.decode(errors="replace")
        self._seen = found + len(text)

    async def finish(self, *, close_stdin: bool = True) -> tuple[int, str, str]:
        """Waits for the end (closing stdin first unless told not to); returns (exit code, all
        stdout, stderr)."""
        assert self.process.stdin is not None
        if close_stdin:
            self.process.stdin.close()  # communicate() without input leaves stdin open
        out, err = await asyncio.wait_for(self.process.communicate(), GUARD)
        self.out += out.decode(errors="replace")
        assert self.process.returncode is not None
        return self.process.returncode, self.out, err.decode(errors="replace")


@pytest.fixture
async def live() -> AsyncIterator[list[Live]]:
    """CLI processes a test starts; any still running at the end are killed."""
    started: list[Live] = []
    yield started
    for process in (p.process for p in started):
        if process.returncode is None:
            process.kill()
            await process.wait()


async def start_live(live: list[Live], stack: Stack, *args: str) -> Live:
    started = await Live.start(stack, *args)
    live.append(started)
    return started


SLOW_TURNS: list[tuple[str, list[tuple[str, str]]]] = [(" ".join(["token"] * 5000), [])]


async def test_ctrl_c_during_a_turn_cancels_the_run_and_the_chat_goes_on(
    stack: Stack, channels: list[grpc.aio.Channel], live: list[Live]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=SLOW_TURNS, token_delay_ms=5))
    chat = await start_live(live, stack, "chat", "--agent", agent.id)
    await chat.until(PROMPT)
    await chat.write("talk\n")
    await chat.until("token")
    chat.process.send_signal(signal.SIGINT)
    await chat.until("[cancelled: cancelled from the chat]")
    await chat.until(PROMPT)  # back at the prompt: the chat goes on
    code, out, err = await chat.finish()
    assert code == 0, f"{out}\n{err}"
    assert "[cancelling the run — press Ctrl-C again to stop waiting]" in err
    (run,) = await runs_of(client, agent.id)
    assert run.status == run_pb2.RUN_STATUS_CANCELLED


async def test_ctrl_c_at_the_prompt_exits_130(
    stack: Stack, channels: list[grpc.aio.Channel], live: list[Live]
) -> None:
    agent = await Client(channels[0]).create_agent(scripted_agent())
    chat = await start_live(live, stack, "chat", "--agent", agent.id)
    await chat.until(PROMPT)
    chat.process.send_signal(signal.SIGINT)
    # stdin stays open: at end of input the chat would exit 0 on its own.
    code, out, err = await chat.finish(close_stdin=False)
    assert code == 130, f"{out}\n{err}"
    assert "Traceback" not in err


async def test_runs_watch_follows_a_live_run_to_its_end(
    stack: Stack, channels: list[grpc.aio.Channel], live: list[Live]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    call = client.stream(agent.id, "email bob@example.com")
    before = await until(call, "tool_approval_required")
    run_id = before[0].run_id
    tool_call_id = before[-1].tool_approval_required.tool_call.id
    watch = await start_live(live, stack, "runs", "watch", run_id)
    await watch.until(f"awaiting approval ({tool_call_id})")
    await client.approve(run_id, tool_call_id)
    await watch.until("Done: the email to bob@example.com was sent.")
    await rest(call)
    code, out, err = await watch.finish()
    assert code == 0, f"{out}\n{err}"
    lines = out.splitlines()
    assert lines[0] == f"[run {run_id} started: agent {agent.id}, CLASSIC]"
    assert "✓ send_email approved" in lines
    assert lines[-1].startswith("[completed: ")


# --- durable runs -------------------------------------------------------------------------


async def durable_run(client: Client) -> tuple[str, str]:
    """(agent id, run id) of a completed durable run answering "count to 3"."""
    agent = await client.create_agent(scripted_agent(mode=agent_pb2.EXECUTION_MODE_DURABLE))
    events = await client.run(agent.id, "count to 3")
    assert events[-1].run_completed.output == "1 2 3", events[-1]
    return agent.id, events[0].run_id


async def test_chat_in_durable_mode_remembers_and_takes_approvals(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())
    result = await agentrun(
        stack,
        "chat",
        "--agent",
        agent.id,
        "--mode",
        "durable",
        stdin="My name is Ada\nemail bob@example.com\ny\nrecall\n",
    )
    assert result.returncode == 0, explain(result)
    assert "✓ send_email approved" in result.stdout, explain(result)
    assert (
        'Earlier in this conversation you said: "My name is Ada"; "email bob@example.com".'
        in result.stdout
    ), explain(result)
    runs = await runs_of(client, agent.id)
    assert len(runs) == 3
    assert {r.execution_mode for r in runs} == {agent_pb2.EXECUTION_MODE_DURABLE}
    assert {r.status for r in runs} == {run_pb2.RUN_STATUS_COMPLETED}
    email_run = next(r for r in runs if r.input == "email bob@example.com")
    sent = [m for m in read_outbox(stack.data_dir) if m["run_id"] == email_run.id]
    assert [m["to"] for m in sent] == ["bob@example.com"]


async def test_runs_replay_prints_a_durable_runs_stored_history(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    _, run_id = await durable_run(Client(channels[0]))
    text = await agentrun(stack, "runs", "replay", run_id)
    assert text.returncode == 0, explain(text)
    lines = text.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"v{i}" for i in range(1, len(lines) + 1)]
    as_json = await agentrun(stack, "runs", "replay", run_id, "--json")
    assert as_json.returncode == 0, explain(as_json)
    stored: list[Any] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [int(e["version"]) for e in stored] == list(range(1, len(lines) + 1))
    assert [line.split()[2] for line in lines] == [e["type"] for e in stored]
    payloads = [json.loads(e["payloadJson"]) for e in stored]
    assert payloads[0]["input"] == "count to 3"
    assert payloads[-1]["output"] == "1 2 3"
    window = await agentrun(stack, "runs", "replay", run_id, "--from", "2", "--to", "2")
    assert window.returncode == 0, explain(window)
    assert window.stdout.splitlines() == [lines[1]]


async def test_runs_fork_starts_a_new_run_from_a_durable_runs_history(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent_id, run_id = await durable_run(client)
    result = await agentrun(stack, "runs", "fork", run_id, "--at", "1", "--json")
    assert result.returncode == 0, explain(result)
    fork = json.loads(result.stdout)
    assert fork["id"] != run_id
    assert fork["agentId"] == agent_id
    assert fork["forkedFromRunId"] == run_id
    assert int(fork["forkedAtVersion"]) == 1
    watched = await client.watch_all(fork["id"])
    assert watched[-1].run_completed.output == "1 2 3"
    plain = await agentrun(stack, "runs", "fork", run_id, "--at", "1")
    assert plain.returncode == 0, explain(plain)
    assert str(uuid.UUID(plain.stdout.strip())) == plain.stdout.strip()
