"""The console in a real Chromium (Debian's package, driven by Playwright) against the real
stack of tests/console_stack.py: approving a durable run from the inbox and watching it stream to
its end, the playground, an agent edit the API refuses, a wrong API key. One browser for all;
each test has its own browser context (its own cookies). The screenshots of the README's
Console section are taken here, into docs/images/."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from agentrun.v1 import agent_pb2, run_service_pb2
from tests.client import Client, scripted_agent
from tests.console_stack import API_KEY, ConsoleStack, wait_for_event

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
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
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
    await page.screenshot(path=str(IMAGES / "console-approvals.png"), full_page=True)
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
    await page.screenshot(path=str(IMAGES / "console-run.png"), full_page=True)


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
    await page.screenshot(path=str(IMAGES / "console-playground.png"), full_page=True)


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


async def test_a_wrong_api_key_is_refused(
    console_stack: ConsoleStack, context: BrowserContext
) -> None:
    page = await sign_in(context, console_stack, key="not-a-key")
    await expect(page.locator("#login-error")).to_have_text("The gateway refused this API key.")
    await page.goto(f"{console_stack.url}/approvals")
    await expect(page).to_have_url(f"{console_stack.url}/login?next=/approvals")
