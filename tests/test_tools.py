"""Tests of the built-in tools: clock, calculator and send_email."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from executor.tools import get_tool
from executor.tools.base import TOOLS, Tool, ToolContext, ToolError
from executor.tools.calculator import MAX_EXPRESSION_LENGTH, CalculatorTool
from executor.tools.clock import ClockTool
from executor.tools.send_email import MAX_BODY_LENGTH, SendEmailTool, message_id, read_outbox

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def make_context(
    data_dir: Path, tool_call_id: str = "call-1", run_id: str = "run-1", tenant: str = "acme"
) -> ToolContext:
    return ToolContext(tenant=tenant, run_id=run_id, tool_call_id=tool_call_id, data_dir=data_dir)


async def call(tool: Tool, arguments: dict[str, Any], data_dir: Path) -> Any:
    return json.loads(await tool.invoke(arguments, make_context(data_dir)))


# --- registry and schemas ---------------------------------------------------------------------


def test_registry_has_exactly_the_three_tools() -> None:
    assert set(TOOLS) == {"clock", "calculator", "send_email"}
    for name, tool in TOOLS.items():
        assert tool.name == name
        assert get_tool(name) is tool
    assert get_tool("nope") is None
    assert get_tool("") is None


@pytest.mark.parametrize("name", ["clock", "calculator", "send_email"])
def test_schema_and_description_are_well_formed(name: str) -> None:
    tool = TOOLS[name]
    assert tool.description.strip()
    schema = tool.parameters
    json.dumps(schema)  # serialisable as sent to a model
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert properties
    assert isinstance(schema["required"], list)
    assert set(schema["required"]) <= set(properties)
    for spec in properties.values():
        assert spec["type"] == "string"
        assert spec["description"].strip()
    schema["properties"].clear()  # callers get a copy: the tool's schema cannot be damaged
    assert tool.parameters["properties"]


def test_required_arguments() -> None:
    assert TOOLS["clock"].parameters["required"] == []
    assert TOOLS["calculator"].parameters["required"] == ["expression"]
    assert set(TOOLS["send_email"].parameters["required"]) == {"to", "subject", "body"}


# --- clock ------------------------------------------------------------------------------------


async def test_clock_defaults_to_utc(tmp_path: Path) -> None:
    for arguments in ({}, {"timezone": None}, {"timezone": "UTC"}):
        result = await call(ClockTool(), arguments, tmp_path)
        assert set(result) == {"utc", "timezone", "local"}
        assert result["timezone"] == "UTC"
        utc = datetime.fromisoformat(result["utc"])
        assert utc.utcoffset() == timedelta(0)
        assert datetime.fromisoformat(result["local"]) == utc


async def test_clock_in_a_named_zone(tmp_path: Path) -> None:
    result = await call(ClockTool(), {"timezone": "Asia/Kolkata"}, tmp_path)
    assert result["timezone"] == "Asia/Kolkata"
    utc = datetime.fromisoformat(result["utc"])
    local = datetime.fromisoformat(result["local"])
    assert local.utcoffset() == timedelta(hours=5, minutes=30)
    assert local == utc  # the same instant


@pytest.mark.parametrize(
    "zone",
    ["Mars/Olympus", "", "Europe", "Europe/", "../../etc/passwd", "/etc/localtime", "x" * 200],
)
async def test_clock_rejects_unknown_zones(tmp_path: Path, zone: str) -> None:
    with pytest.raises(ToolError, match="unknown time zone"):
        await call(ClockTool(), {"timezone": zone}, tmp_path)


@pytest.mark.parametrize("zone", [3, ["UTC"], {"name": "UTC"}, True])
async def test_clock_rejects_wrong_types(tmp_path: Path, zone: object) -> None:
    with pytest.raises(ToolError, match="'timezone'"):
        await call(ClockTool(), {"timezone": zone}, tmp_path)


async def test_clock_rejects_unknown_arguments(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="zone"):
        await call(ClockTool(), {"zone": "UTC"}, tmp_path)


# --- calculator -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 / 4", 2.5),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("2 ** -2", 0.25),
        ("2 ** 0.5", 2**0.5),
        ("(-2) ** 3", -8),
        ("-(3)", -3),
        ("+3", 3),
        ("1.5e3 + 0x10", 1516.0),
        ("  1 + 1  ", 2),
        ("sqrt(16)", 4.0),
        ("abs(-3)", 3),
        ("round(3.14159, 2)", 3.14),
        ("round(2.5)", 2),
        ("round(1234, -2)", 1200),
        ("min(3, 1, 2)", 1),
        ("max(1, 2.5, -3)", 2.5),
        ("max(7)", 7),
        ("pi", 3.141592653589793),
        ("e ** 0", 1.0),
        ("2 ** 1000", 2**1000),
        ("10 ** 1000", 10**1000),
    ],
)
async def test_calculator_results(tmp_path: Path, expression: str, expected: float) -> None:
    result = await call(CalculatorTool(), {"expression": expression}, tmp_path)
    assert result == {"expression": expression, "result": expected}
    assert type(result["result"]) is type(expected)


ATTACKS = [
    ("__import__('os').system('x')", "not allowed"),
    ("__import__('os')", "calling '__import__' is not allowed"),
    ("(1).__class__", "attribute access is not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
    ("[x for x in ()]", "comprehensions are not allowed"),
    ("(x for x in ())", "comprehensions are not allowed"),
    ("a", "the name 'a' is not allowed"),
    ("'s'*9", "strings are not allowed"),
    ("b's'", "bytes are not allowed"),
    ("f'{1}'", "strings are not allowed"),
    ("lambda: 1", "lambdas are not allowed"),
    ("(lambda: 1)()", "lambdas are not allowed"),
    ("eval('1')", "calling 'eval' is not allowed"),
    ("exec('1')", "calling 'exec' is not allowed"),
    ("open('/etc/passwd')", "calling 'open' is not allowed"),
    ("sqrt.__call__(4)", "attribute access is not allowed"),
    ("sqrt", "function 'sqrt' must be called"),
    ("round(1.5, ndigits=1)", "keyword arguments are not allowed"),
    ("max(*[1, 2])", "not allowed"),
    ("[1, 2]", "lists are not allowed"),
    ("(1, 2)", "tuples are not allowed"),
    ("{1: 2}", "dicts are not allowed"),
    ("{1}", "sets are not allowed"),
    ("(1)[0]", "subscripts are not allowed"),
    ("1 < 2", "comparisons are not allowed"),
    ("1 and 2", "boolean operators are not allowed"),
    ("not 1", "the operator not is not allowed"),
    ("1 if 1 else 2", "conditional expressions are not allowed"),
    ("(x := 1)", "assignments are not allowed"),
    ("1 << 3", "the operator << is not allowed"),
    ("1 | 2", "the operator | is not allowed"),
    ("~1", "the operator ~ is not allowed"),
    ("True + 1", "booleans are not allowed"),
    ("None", "the constant None is not allowed"),
    ("1j", "complex numbers are not allowed"),
    ("import os", "invalid expression syntax"),
    ("1 +", "invalid expression syntax"),
    ("x = 1", "invalid expression syntax"),
    ("1\x00", "invalid expression"),
    ("10**10**10", "exponent 10000000000 is too large"),
    ("9**9**9**9", "exponent 387420489 is too large"),
    ("2 ** 1001", "exponent 1001 is too large"),
    ("2 ** -1001", "exponent -1001 is too large"),
    ("16 ** 1000", "result is too large"),
    ("(10 ** 1000) * (10 ** 1000)", "result is too large"),
    ("2.5 ** 1000", "result is too large"),
    ("1e308 * 10", "result is too large"),
    ("1e400", "numbers must be finite"),
    ("(-8) ** (1 / 3)", "not a real number"),
    ("sqrt(-1)", "negative number"),
    ("sqrt(1, 2)", "exactly one argument"),
    ("min()", "at least one argument"),
    ("round(1, 2, 3)", "one or two arguments"),
    ("round(1.5, 1000)", "second argument"),
    ("round(1.5, 0.5)", "second argument"),
    ("1 / 0", "division by zero"),
    ("1 // 0", "division by zero"),
    ("1 % 0", "division by zero"),
    ("1.0 / 0.0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("", "expression is empty"),
    ("   ", "expression is empty"),
    ("-" * 150 + "1", "nested too deeply"),
    ("+".join(["1"] * 200), "nested too deeply"),
    ("+".join(["(1)"] * 120), "nested too deeply"),
    ("1" + "*1" * 100, "nested too deeply"),
    ("max(" + ",".join(["-1"] * 165) + ")", "too complex"),
    ("1" * (MAX_EXPRESSION_LENGTH + 1), "too long"),
]


@pytest.mark.parametrize(("expression", "message"), ATTACKS)
async def test_calculator_rejects(tmp_path: Path, expression: str, message: str) -> None:
    with pytest.raises(ToolError, match="calculator: ") as caught:
        await call(CalculatorTool(), {"expression": expression}, tmp_path)
    assert message in str(caught.value)


async def test_calculator_names_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ToolError) as caught:
        await call(CalculatorTool(), {"expression": "foo(1)"}, tmp_path)
    text = str(caught.value)
    assert "calling 'foo' is not allowed" in text
    for allowed in ("sqrt", "abs", "round", "min", "max", "pi", "**"):
        assert allowed in text


@pytest.mark.parametrize("expression", [None, 12, 1.5, ["1+1"], {"e": "1"}])
async def test_calculator_rejects_wrong_types(tmp_path: Path, expression: object) -> None:
    arguments = {} if expression is None else {"expression": expression}
    with pytest.raises(ToolError, match="'expression' must be a string"):
        await call(CalculatorTool(), arguments, tmp_path)


async def test_calculator_rejects_unknown_arguments(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="precision"):
        await call(CalculatorTool(), {"expression": "1", "precision": 2}, tmp_path)


async def test_calculator_accepts_the_longest_expression(tmp_path: Path) -> None:
    expression = " " * (MAX_EXPRESSION_LENGTH - 1) + "7"
    result = await call(CalculatorTool(), {"expression": expression}, tmp_path)
    assert result["result"] == 7


# --- send_email -------------------------------------------------------------------------------

EMAIL = {"to": "ada@example.com", "subject": "Hello", "body": "First line.\nSecond line."}


async def test_send_email_records_the_message(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    context = make_context(data_dir, tool_call_id="call-7", run_id="run-9", tenant="acme")
    result = json.loads(await SendEmailTool().invoke(dict(EMAIL), context))
    assert result == {
        "status": "sent",
        "to": "ada@example.com",
        "message_id": message_id("acme", "run-9:call-7"),
    }
    [record] = read_outbox(data_dir)
    assert record["idempotency_key"] == "run-9:call-7"
    assert record["tenant"] == "acme"
    assert record["run_id"] == "run-9"
    assert record["tool_call_id"] == "call-7"
    assert {k: record[k] for k in EMAIL} == EMAIL
    assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)
    lines = (data_dir / "outbox.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record]


async def test_send_email_dedupes_by_idempotency_key(tmp_path: Path) -> None:
    tool = SendEmailTool()
    first = await tool.invoke(dict(EMAIL), make_context(tmp_path, "call-1"))
    # A retry of the same call (same key) sends nothing and answers the same, even if the model
    # produced different arguments on the retried turn.
    again = await tool.invoke(dict(EMAIL), make_context(tmp_path, "call-1"))
    changed = await tool.invoke(
        {**EMAIL, "to": "bob@example.com"}, make_context(tmp_path, "call-1")
    )
    assert first == again == changed
    other = json.loads(await tool.invoke(dict(EMAIL), make_context(tmp_path, "call-2")))
    assert other["message_id"] != json.loads(first)["message_id"]
    records = read_outbox(tmp_path)
    assert [r["idempotency_key"] for r in records] == ["run-1:call-1", "run-1:call-2"]


async def test_send_email_keys_are_per_tenant(tmp_path: Path) -> None:
    tool = SendEmailTool()
    a = await tool.invoke(dict(EMAIL), make_context(tmp_path, tenant="a"))
    b = await tool.invoke(dict(EMAIL), make_context(tmp_path, tenant="b"))
    assert a != b
    assert [r["tenant"] for r in read_outbox(tmp_path)] == ["a", "b"]


async def test_send_email_concurrent_calls_in_one_process(tmp_path: Path) -> None:
    tool = SendEmailTool()
    results = await asyncio.gather(
        *(tool.invoke(dict(EMAIL), make_context(tmp_path, f"call-{i % 5}")) for i in range(40))
    )
    assert len(set(results)) == 5
    keys = [r["idempotency_key"] for r in read_outbox(tmp_path)]
    assert sorted(keys) == sorted(f"run-1:call-{i}" for i in range(5))


async def test_send_email_survives_a_torn_last_line(tmp_path: Path) -> None:
    await SendEmailTool().invoke(dict(EMAIL), make_context(tmp_path, "call-1"))
    outbox = tmp_path / "outbox.jsonl"
    with outbox.open("a") as file:
        file.write('{"idempotency_key": "run-1:call-2", "tenant": "acme", "to"')  # crash mid-write
    assert [r["idempotency_key"] for r in read_outbox(tmp_path)] == ["run-1:call-1"]
    await SendEmailTool().invoke(dict(EMAIL), make_context(tmp_path, "call-2"))
    assert [r["idempotency_key"] for r in read_outbox(tmp_path)] == [
        "run-1:call-1",
        "run-1:call-2",
    ]
    assert outbox.read_text().endswith("}\n")


def test_read_outbox_without_an_outbox(tmp_path: Path) -> None:
    assert read_outbox(tmp_path) == []
    assert read_outbox(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"subject": "s", "body": "b"}, "'to' is required"),
        ({"to": "ada@example.com", "body": "b"}, "'subject' is required"),
        ({"to": "ada@example.com", "subject": "s"}, "'body' is required"),
        ({**EMAIL, "to": 42}, "'to' must be a string"),
        ({**EMAIL, "subject": ["s"]}, "'subject' must be a string"),
        ({**EMAIL, "body": {"text": "b"}}, "'body' must be a string"),
        ({**EMAIL, "to": "not-an-address"}, "'to' is not a valid email address"),
        ({**EMAIL, "to": "ada@"}, "'to' is not a valid email address"),
        ({**EMAIL, "to": "@example.com"}, "'to' is not a valid email address"),
        ({**EMAIL, "to": "ada@example"}, "'to' is not a valid email address"),
        ({**EMAIL, "to": "a b@example.com"}, "'to' is not a valid email address"),
        ({**EMAIL, "to": "ada@example.com, eve@evil.com"}, "'to' is not a valid email address"),
        ({**EMAIL, "to": "ada@example.com\nBcc: eve@evil.com"}, "'to' must be a single line"),
        ({**EMAIL, "to": "a" * 250 + "@example.com"}, "'to' is too long"),
        ({**EMAIL, "subject": "s" * 501}, "'subject' is too long"),
        ({**EMAIL, "subject": "Hi\r\nBcc: eve@evil.com"}, "'subject' must be a single line"),
        ({**EMAIL, "body": "b" * (MAX_BODY_LENGTH + 1)}, "'body' is too long"),
        ({**EMAIL, "cc": "eve@evil.com"}, "unknown argument(s): cc"),
    ],
)
async def test_send_email_rejects_bad_arguments(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ToolError) as caught:
        await SendEmailTool().invoke(arguments, make_context(tmp_path))
    assert message in str(caught.value)
    assert read_outbox(tmp_path) == []


async def test_send_email_accepts_the_longest_body(tmp_path: Path) -> None:
    body = "b" * MAX_BODY_LENGTH
    await SendEmailTool().invoke({**EMAIL, "body": body}, make_context(tmp_path))
    assert read_outbox(tmp_path)[0]["body"] == body


async def test_send_email_reports_an_unwritable_outbox(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ToolError, match="could not write the outbox"):
        await SendEmailTool().invoke(dict(EMAIL), make_context(blocker / "data"))


# Run by each child process: waits for "go" on stdin so both start together, then sends one email
# per call id given, concurrently within the process, and prints each result as a JSON line.
_CHILD = """
import asyncio, json, sys
from pathlib import Path
from executor.tools.base import ToolContext
from executor.tools.send_email import SendEmailTool

async def main() -> None:
    data_dir, label, call_ids = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    print("ready", flush=True)
    sys.stdin.readline()
    tool = SendEmailTool()
    email = {"to": "ada@example.com", "subject": label, "body": "hi"}
    results = await asyncio.gather(*(
        tool.invoke(dict(email), ToolContext("acme", "run-1", call_id, data_dir))
        for call_id in call_ids
    ))
    for call_id, result in zip(call_ids, results):
        print(json.dumps({"call_id": call_id, "result": json.loads(result)}), flush=True)

asyncio.run(main())
"""


def test_send_email_dedupes_across_processes(tmp_path: Path) -> None:
    labels = ("A", "B", "C", "D")
    shared = [f"shared-{i}" for i in range(100)]
    own = {label: [f"{label}-{i}" for i in range(10)] for label in labels}
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    children = {
        label: subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), label, *shared, *own[label]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
        )
        for label in labels
    }
    outputs: dict[str, str] = {}
    try:
        for child in children.values():
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        for child in children.values():  # start all at once: "go" to every child, then wait
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for label, child in children.items():
            outputs[label], _ = child.communicate(timeout=60)
            assert child.returncode == 0
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()

    records = read_outbox(tmp_path)
    # Every call was sent exactly once, whichever process got there first.
    expected = [*shared, *(call_id for label in labels for call_id in own[label])]
    assert sorted(r["tool_call_id"] for r in records) == sorted(expected)
    by_call = {r["tool_call_id"]: r for r in records}
    for label in labels:
        assert all(by_call[call_id]["subject"] == label for call_id in own[label])
    assert {by_call[call_id]["subject"] for call_id in shared} <= set(labels)
    # The file holds exactly those records, one complete JSON line each.
    lines = (tmp_path / "outbox.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records

    # Every process got the same answer for each shared call.
    answers = {
        label: {
            row["call_id"]: row["result"] for row in map(json.loads, outputs[label].splitlines())
        }
        for label in labels
    }
    for label in labels:
        assert len(answers[label]) == len(shared) + len(own[label])
        for call_id in shared:
            assert answers[label][call_id] == answers["A"][call_id]
            assert answers[label][call_id]["message_id"] == message_id("acme", f"run-1:{call_id}")
