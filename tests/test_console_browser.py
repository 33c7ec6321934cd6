"""The console in a real Chromium (Debian's package, driven by Playwright) against the real
stack of tests/console_stack.py: approving a durable run from the inbox and watching it stream to
its end, a run page's one WatchRun, an executor killed under a run page, the playground,
an agent edit the API refuses, a wrong API key. One browser for all;
each test has its own browser context (its own cookies). The screenshots of the README's
Console section are taken here (into docs/images/ with AGENTRUN_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from agentrun.v1 import agent_pb2, run_service_pb2
from tests.client import Client, scripted_agent
from tests.console_stack import API_KEY, GUARD, ConsoleStack, wait_for_event

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
README_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def screenshot_path(name: str) -> str:
    """Where a screenshot goes: the README's images with AGENTRUN_UPDATE_SCREENSHOTS=1, else a
    temporary folder (a test run leaves the tree as it was)."""
    if os.environ.get("AGENTRUN_UPDATE_SCREENSHOTS") == "1":
        return str(README_IMAGES / name)
    folder = Path(tempfile.gettempdir()) / "agentrun-screenshots"
    folder.mkdir(exist_ok=True)
    return str(folder / name)


# Bounds a hang (a page that never shows what it should); never a timing assert.
WAIT_MS = 30_000
VIEWPORT = {"width": 1280, "height": 900}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    opened = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    opened.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    yield opened
    await opened.close()


async def sign_in(context: BrowserContext, console: ConsoleStack, key: str = API_KEY) -> Page:
    page = await context.new_page()
    await page.goto(f"{console.url}/runs")
    await page.fill("input[name=api_key]", key)
    await page.click("form[action='/login'] button[type=submit]")
    return page


def email_call(to: str) -> tuple[str, str]:
    return ("send_email", json.dumps({"to": to, "subject": "Hello", "body": "From the console"}))


async def test_a_durable_run_approved_in_the_inbox_streams_to_its_end(
    console_stack: ConsoleStack, grpc_client: Client, context: BrowserContext
) -> None:
    # The run stops twice for approval: after the first, its next model call streams text
    # and asks again, so the page shows the new tokens of a run that has not ended.
    agent = await grpc_client.create_agent(
        scripted_agent(
            mode=agent_pb2.EXECUTION_MODE_DURABLE,
            turns=[
                ("I will write to Bob first.", [email_call("bob@example.com")]),
                ("Bob has his email. Now Carol's.", [email_call("carol@example.com")]),
                ("Both emails are sent.", []),
            ],
            token_delay_ms=5,
        )
    )
    started = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(
            agent_id=agent.id, input="Write to Bob and Carol", request_id=str(uuid.uuid4())
        ),
        metadata=grpc_client.metadata,
    )
    run_id = started.run.id
    await wait_for_event(grpc_client, run_id, "tool_approval_required")

    page = await sign_in(context, console_stack)
    await page.goto(f"{console_stack.url}/approvals")
    card = page.locator(f"article.approval[data-run='{run_id}']")
    await expect(card).to_contain_text("bob@example.com")
    await page.screenshot(path=screenshot_path("console-approvals.png"), full_page=True)
    await card.locator("button[value=approve]").click()

    await page.wait_for_url(f"**/runs/{run_id}")
    timeline = page.locator("#timeline")
    await expect(timeline.locator("[data-step='3'] .step-text")).to_have_text(
        "Bob has his email. Now Carol's."
    )
    await expect(timeline).not_to_have_attribute("data-ended", "completed")
    waiting = timeline.locator(".approval.waiting")
    await expect(waiting).to_contain_text("waiting for approval")
    await expect(timeline.locator("[data-step='4']")).to_contain_text("carol@example.com")
    await waiting.locator("button.approve").click()

    await expect(timeline).to_have_attribute("data-ended", "completed")
    await expect(timeline.locator(".end.completed")).to_contain_text("Both emails are sent.")
    await expect(timeline.locator(".approval.approved")).to_have_count(2)
    await expect(timeline.locator(".result.ok")).to_have_count(2)
    await expect(page.locator("#run-status")).to_have_text("COMPLETED")
    history = page.locator("#history table.history")
    await expect(history.locator("tr[data-type='ToolApprovalDecided']")).to_have_count(2)
    await expect(history.locator("tr[data-type='Completed']")).to_have_count(1)
    await page.screenshot(path=screenshot_path("console-run.png"), full_page=True)


async def test_the_playground_chats_and_asks_for_approval(
    console_stack: ConsoleStack, grpc_client: Client, context: BrowserContext
) -> None:
    agent = await grpc_client.create_agent(scripted_agent(token_delay_ms=5))
    page = await sign_in(context, console_stack)
    await page.goto(f"{console_stack.url}/playground?agent={agent.id}")
    await page.select_option("#chat-mode", "durable")
    await page.fill("#chat-input", "count to 5")
    await page.click("#chat-send")
    first = page.locator(".message.agent").nth(0)
    await expect(first.locator(".end.completed")).to_contain_text("1 2 3 4 5")
    await expect(first).to_contain_text("durable")

    await page.select_option("#chat-mode", "classic")
    await page.fill("#chat-input", "email bob@example.com")
    await page.click("#chat-send")
    second = page.locator(".message.agent").nth(1)
    await expect(second.locator(".approval.waiting")).to_contain_text("waiting for approval")
    await second.locator("input[name=reason]").fill("not today")
    await second.locator("button.deny").click()
    await expect(second.locator(".approval.denied")).to_contain_text("not today")
    await expect(second).to_have_attribute("data-ended", "completed")
    await expect(second).to_contain_text("classic")
    await page.screenshot(path=screenshot_path("console-playground.png"), full_page=True)


async def test_the_run_list_filters_and_shows_new_runs_while_open(
    console_stack: ConsoleStack, grpc_client: Client, context: BrowserContext
) -> None:
    agent = await grpc_client.create_agent(scripted_agent())
    page = await sign_in(context, console_stack)
    await page.fill("#run-filters input[name=agent]", agent.id)
    await page.select_option("#run-filters select[name=status]", "completed")
    await page.click("#run-filters button[type=submit]")
    rows = page.locator("#runs tbody tr[data-run]")
    await expect(page.locator("#runs tbody")).to_contain_text("No runs.")
    waiting = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent.id, input="email bob@example.com"),
        metadata=grpc_client.metadata,
    )
    done = (await grpc_client.run(agent.id, "count to 2"))[0].run_id
    await expect(rows).to_have_count(1)  # the open page shows the new run, not the waiting one
    await expect(rows.first).to_have_attribute("data-run", done)
    await page.select_option("#run-filters select[name=status]", "awaiting_approval")
    await page.click("#run-filters button[type=submit]")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-run", waiting.run.id)
    await grpc_client.runs.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=waiting.run.id), metadata=grpc_client.metadata
    )


async def test_an_agent_edit_with_an_invalid_value_shows_the_apis_message(
    console_stack: ConsoleStack, grpc_client: Client, context: BrowserContext
) -> None:
    agent = await grpc_client.create_agent(scripted_agent())
    page = await sign_in(context, console_stack)
    await page.goto(f"{console_stack.url}/agents/{agent.id}/edit")
    await page.fill("input[name=max_model_calls]", "5000")
    await page.click("#agent-edit button[type=submit]")
    await expect(page.locator("#edit-error")).to_contain_text(
        "INVALID_ARGUMENT: agent.max_model_calls"
    )
    await page.fill("input[name=max_model_calls]", "7")
    await page.fill("textarea[name=instructions]", "Be brief.")
    await page.click("#agent-edit button[type=submit]")
    await page.wait_for_url(f"**/agents/{agent.id}")
    await expect(page.locator("h1")).to_contain_text("version 2")
    await expect(page.locator("dl.summary")).to_contain_text("Be brief.")
    await page.click(".versions a:text-is('1')")
    await expect(page.locator("h1")).to_contain_text("version 1 (latest: 2)")
    await expect(page.locator("dl.summary")).not_to_contain_text("Be brief.")


async def test_a_wrong_api_key_is_refused(
    console_stack: ConsoleStack, context: BrowserContext
) -> None:
    page = await sign_in(context, console_stack, key="not-a-key")
    await expect(page.locator("#login-error")).to_have_text("The gateway refused this API key.")
    await page.goto(f"{console_stack.url}/approvals")
    await expect(page).to_have_url(f"{console_stack.url}/login?next=/approvals")


async def watch_runs_ended(console: ConsoleStack) -> int:
    """WatchRun calls the gateway has ended so far, whatever their status (its metrics)."""
    async with httpx.AsyncClient(timeout=GUARD) as http:
        metrics = (await http.get(f"http://{console.gateway_metrics}/metrics")).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("agentrun_grpc_server_handled_total{")
            and "RunService/WatchRun" in line
        )
    )


async def watch_runs_ended_reach(console: ConsoleStack, count: int) -> bool:
    """Waits until the gateway has ended ``count`` WatchRun calls; False if it ended more
    (polling its counter, which says nothing of when they ended)."""
    async with asyncio.timeout(GUARD):
        while True:
            ended = await watch_runs_ended(console)
            if ended >= count:
                return ended == count
            await asyncio.sleep(0.2)


async def test_a_run_page_holds_one_watch_run_and_rebuilds_its_timeline_on_reload(
    console_stack: ConsoleStack, grpc_client: Client, context: BrowserContext
) -> None:
    agent = await grpc_client.create_agent(
        scripted_agent(
            mode=agent_pb2.EXECUTION_MODE_DURABLE,
            turns=[("Asking first.", [email_call("bob@example.com")]), ("Done.", [])],
        )
    )
    ended_before = await watch_runs_ended(console_stack)
    page = await sign_in(context, console_stack)
    started = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent.id, input="Write to Bob"),
        metadata=grpc_client.metadata,
    )
    run_id = started.run.id
    page_loads = 3
    timeline = page.locator("#timeline")
    for _ in range(page_loads):
        await page.goto(f"{console_stack.url}/runs/{run_id}")
        await expect(timeline.locator(".approval.waiting")).to_contain_text("waiting")
        await expect(timeline.locator("[data-step='1'] .step-text")).to_have_text("Asking first.")
        await expect(timeline.locator(".step")).to_have_count(2)
    # Each page load held one WatchRun: those of the pages left by a reload ended while the run
    # still waits, the last one ends with the run.
    assert await watch_runs_ended_reach(console_stack, ended_before + page_loads - 1)
    await timeline.locator("button.approve").click()
    await expect(timeline).to_have_attribute("data-ended", "completed")
    await page.close()
    assert await watch_runs_ended_reach(console_stack, ended_before + page_loads)


async def test_a_run_whose_executor_is_killed_shows_attempt_2_and_the_handover(
    console_stack: ConsoleStack, grpc_client: Client, context: BrowserContext
) -> None:
    answer = " ".join(f"word{i}" for i in range(40))
    agent = await grpc_client.create_agent(
        scripted_agent(
            mode=agent_pb2.EXECUTION_MODE_DURABLE, turns=[(answer, [])], token_delay_ms=50
        )
    )
    page = await sign_in(context, console_stack)
    started = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent.id, input="Say many words"),
        metadata=grpc_client.metadata,
    )
    run_id = started.run.id
    await page.goto(f"{console_stack.url}/runs/{run_id}")
    timeline = page.locator("#timeline")
    step = timeline.locator("[data-step='1']")
    await expect(step.locator(".step-text")).to_contain_text("word0")

    stack = console_stack.stack
    killed = stack.executors[0]
    killed.kill()
    stack.executors.remove(killed)
    # Another executor where the gateway looks for one: it takes the run up.
    listen = f"127.0.0.1:{console_stack.executor_port}"
    await asyncio.to_thread(stack.start_executor, AGENTRUN_EXECUTOR_LISTEN=listen)

    await expect(step).to_have_attribute("data-attempt", "2")
    await expect(step.locator(".attempt-note")).to_contain_text("attempt 2 started")
    await expect(timeline).to_have_attribute("data-ended", "completed")
    await expect(step.locator(".step-text")).to_have_text(answer)  # attempt 2's text, once
    history = page.locator("#history table.history")
    await expect(history.locator("tr[data-type='Resumed']")).to_have_count(1)
    await expect(step.locator("[data-handover]")).to_contain_text("took the run up at this step")
