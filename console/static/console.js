// The agentrun console's few scripts: live fragments, a run's timeline from its one event
// stream, and the playground. No API key ever reaches this code: the session cookie is HttpOnly.
"use strict";

const csrfToken = () => document.querySelector('meta[name="csrf-token"]').content;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const pretty = (text) => {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
};
const seconds = (from, to) => ((new Date(to) - new Date(from)) / 1000).toFixed(2) + " s";
const clock = (time) => (time ? new Date(time).toISOString().slice(11, 23) : "");
const label = (value, prefix) => String(value || "").replace(prefix, "").toLowerCase().replace(/_/g, " ");

// A list that the server sends again whenever it changed, while the page is open.
function followLive(container) {
  const source = new EventSource(container.dataset.live);
  let edited = false;
  if (container.dataset.keepWhileEditing) {
    container.addEventListener("input", () => { edited = true; });
  }
  source.addEventListener("fragment", (message) => {
    if (edited) {
      const note = document.getElementById("inbox-changed");
      if (note) note.hidden = false;
      return;
    }
    container.innerHTML = message.data;
  });
  source.addEventListener("problem", (message) => console.warn(message.data));
  window.addEventListener("pagehide", () => source.close());
}

async function loadFragment(container, url) {
  const response = await fetch(url, { headers: { "X-Console-Fetch": "1" } });
  container.innerHTML = await response.text();
  for (const link of container.querySelectorAll("[data-history-from]")) {
    link.addEventListener("click", (click) => {
      click.preventDefault();
      loadFragment(container, `${container.dataset.src}?from=${link.dataset.historyFrom}`);
    });
  }
}

// Decides a tool call from a timeline (run page, playground) through the same endpoint as the
// inbox's forms.
async function decide(runId, callId, fields) {
  const body = new FormData();
  for (const [key, value] of Object.entries(fields)) body.append(key, value);
  const response = await fetch(`/runs/${runId}/approvals/${encodeURIComponent(callId)}`, {
    method: "POST",
    body,
    headers: { "X-CSRF-Token": csrfToken(), "X-Console-Fetch": "1" },
  });
  const answer = await response.json();
  return answer.error || "";
}

// A run's timeline, built from its events in sequence order. Text follows the attempt rule:
// a step shows the text of its highest attempt only.
class Timeline {
  constructor(container, runId, { decisions = true, onEnd = null } = {}) {
    this.container = container;
    this.runId = runId;
    this.decisions = decisions;
    this.onEnd = onEnd;
    this.steps = new Map();
    this.calls = new Map();
    this.source = null;
  }

  follow() {
    // One EventSource: one WatchRun on the gateway. On a dropped connection the browser
    // reconnects with Last-Event-ID and the stream resumes after the last event shown.
    this.source = new EventSource(`/runs/${this.runId}/events`);
    this.source.addEventListener("run-event", (message) => this.add(JSON.parse(message.data)));
    this.source.addEventListener("end", () => this.stop());
    this.source.addEventListener("problem", (message) => {
      this.container.append(el("p", { class: "flash error" }, message.data));
      this.stop();
    });
    window.addEventListener("pagehide", () => this.stop());
  }

  stop() {
    if (this.source) this.source.close();
    this.source = null;
  }

  step(index, kind) {
    let step = this.steps.get(index);
    if (!step) {
      const head = el("div", { class: "step-head" });
      const node = el("section", { class: "step running", "data-step": index }, head);
      step = { index, kind, node, head, attempt: 0, started: null, text: null, body: el("div", { class: "step-body" }) };
      node.append(step.body);
      this.container.append(node);
      this.steps.set(index, step);
    }
    if (kind) step.kind = kind;
    return step;
  }

  renderHead(step, status, extra = "") {
    step.head.replaceChildren(
      el("strong", {}, `Step ${step.index}`), " · ",
      el("span", { class: "kind" }, label(step.kind, "STEP_KIND_") || "step"), " · ",
      el("span", { class: "attempt" }, `attempt ${step.attempt || 1}`), " · ",
      el("span", { class: `step-status ${status}` }, status),
      extra ? " · " + extra : "",
    );
    step.node.className = `step ${status}`;
    step.node.setAttribute("data-attempt", step.attempt || 1);
  }

  add(event) {
    const kind = Object.keys(event).find((key) => !["run_id", "sequence", "time"].includes(key));
    const body = event[kind];
    this.container.setAttribute("data-last-sequence", event.sequence);
    const handler = this[`on_${kind}`];
    if (handler) handler.call(this, body, event.time);
  }

  on_run_started(started) {
    const run = started.run;
    this.container.append(el("p", { class: "event" }, `${clock(run.create_time)} run started: agent ${run.agent_id} (version ${run.agent_version}), ${label(run.execution_mode, "EXECUTION_MODE_")}`));
  }

  on_step_started(started, time) {
    const step = this.step(started.step_index || 0, started.kind);
    const attempt = started.attempt || 1;
    if (step.attempt && attempt > step.attempt) {
      // A new attempt: the earlier attempt's text is void.
      if (step.text) { step.text.remove(); step.text = null; }
      step.body.append(el("p", { class: "attempt-note" }, `${clock(time)} attempt ${attempt} started (attempt ${step.attempt} was abandoned: retried, or handed over to another executor)`));
    }
    step.attempt = Math.max(step.attempt, attempt);
    step.started = time;
    this.renderHead(step, "running");
  }

  on_text_delta(delta) {
    const step = this.step(delta.step_index || 0, "STEP_KIND_MODEL_CALL");
    if ((delta.attempt || 1) < step.attempt) return; // text of an abandoned attempt
    if (!step.text) {
      step.text = el("div", { class: "step-text prose" });
      step.body.prepend(step.text);
    }
    step.text.append(delta.text || "");
  }

  // A call's card lives in the tool calls step that runs it; the model call step that asked
  // for it says so in one line.
  callCard(call, stepIndex) {
    let card = this.calls.get(call.id);
    if (!card) {
      card = el("div", { class: "call", "data-call": call.id });
      card.append(el("div", {}, el("strong", { class: "tool" }, call.name), " ", el("code", {}, call.id)));
      card.append(el("pre", { class: "arguments" }, pretty(call.arguments_json || "{}")));
      this.step(stepIndex).body.append(card);
      this.calls.set(call.id, card);
    }
    return card;
  }

  on_tool_call_requested(requested, time) {
    const call = requested.tool_call;
    const notes = [requested.requires_approval ? "needs approval" : "", requested.client_executes ? "executed by the client" : ""].filter(Boolean);
    this.step(requested.step_index || 0).body.append(el("div", { class: "asked event" },
      `${clock(time)} asked for `, el("strong", {}, call.name), ` (${call.id})${notes.length ? " · " + notes.join(" · ") : ""}`));
  }

  on_tool_approval_required(required, time) {
    const call = required.tool_call;
    const card = this.callCard(call, required.step_index || 0);
    const box = el("div", { class: "approval waiting", "data-approval": call.id },
      el("span", {}, `${clock(time)} waiting for approval (expires ${required.expire_time || "never"})`));
    card.append(box);
    if (!this.decisions) return;
    const args = el("textarea", { rows: 3, class: "mono", name: "arguments" }, pretty(call.arguments_json || "{}"));
    const reason = el("input", { placeholder: "reason for a denial", name: "reason" });
    const problem = el("p", { class: "flash error", hidden: true });
    const send = (decision) => async () => {
      problem.hidden = true;
      const error = await decide(this.runId, call.id, {
        decision, reason: reason.value, arguments: args.value, original_arguments: call.arguments_json || "",
      });
      if (error) { problem.textContent = error; problem.hidden = false; }
    };
    box.append(el("div", { class: "decide" }, args,
      el("div", { class: "actions" },
        el("button", { type: "button", onclick: send("approve"), class: "approve" }, "Approve"),
        reason,
        el("button", { type: "button", onclick: send("deny"), class: "danger deny" }, "Deny")),
      problem));
  }

  on_tool_approval_resolved(resolved, time) {
    const box = this.container.querySelector(`[data-approval="${CSS.escape(resolved.tool_call_id)}"]`);
    let text = `${clock(time)} `;
    if (resolved.approved) text += "approved by a person";
    else if (resolved.timed_out) text += "denied: no decision in time";
    else text += `denied by a person${resolved.reason ? ": " + resolved.reason : ""}`;
    const node = el("div", { class: `approval ${resolved.approved ? "approved" : "denied"}` }, text);
    if (resolved.edited_arguments_json) node.append(el("pre", {}, "runs with: " + pretty(resolved.edited_arguments_json)));
    if (box) box.replaceWith(node);
    else {
      const card = this.calls.get(resolved.tool_call_id);
      (card || this.container).append(node);
    }
  }

  on_client_tool_call_required(required, time) {
    const card = this.callCard(required.tool_call, required.step_index || 0);
    card.append(el("div", { class: "event" }, `${clock(time)} waiting for the client's result`));
  }

  on_tool_result(result, time) {
    const card = this.calls.get(result.tool_call_id) || this.callCard({ id: result.tool_call_id, name: result.tool_name }, result.step_index || 0);
    card.append(el("div", { class: `result ${result.is_error ? "failed" : "ok"}` },
      `${clock(time)} ${result.is_error ? "failed" : "result"}: `, el("pre", {}, pretty(result.output || ""))));
  }

  on_step_completed(completed, time) {
    const step = this.step(completed.step_index || 0, completed.kind);
    const usage = completed.usage;
    const used = usage && (usage.input_tokens || usage.output_tokens)
      ? `${usage.input_tokens || 0} input + ${usage.output_tokens || 0} output tokens` : "";
    this.renderHead(step, "completed", [step.started ? seconds(step.started, time) : "", used].filter(Boolean).join(" · "));
  }

  end(node, status) {
    for (const step of this.steps.values()) {
      if (step.node.classList.contains("running")) this.renderHead(step, status === "completed" ? "completed" : status);
    }
    this.container.append(node);
    this.container.setAttribute("data-ended", status);
    const cancel = document.getElementById("cancel-form");
    if (cancel) cancel.remove();
    const badge = document.getElementById("run-status");
    if (badge) { badge.textContent = status.toUpperCase(); badge.className = `status s-${status}`; }
    if (this.onEnd) this.onEnd(status);
  }

  on_run_completed(completed, time) {
    const usage = completed.usage || {};
    this.end(el("div", { class: "end completed" }, `${clock(time)} completed · ${usage.input_tokens || 0} input + ${usage.output_tokens || 0} output tokens`,
      el("div", { class: "prose output" }, completed.output || "")), "completed");
  }

  on_run_failed(failed, time) {
    const error = failed.error || {};
    this.end(el("div", { class: "end failed" }, `${clock(time)} failed · ${label(error.code, "RUN_ERROR_CODE_")}: ${error.message || ""}`), "failed");
  }

  on_run_cancelled(cancelled, time) {
    this.end(el("div", { class: "end cancelled" }, `${clock(time)} cancelled${cancelled.reason ? ": " + cancelled.reason : ""}`), "cancelled");
  }
}

// A durable run's history says which executor took a step up (Resumed) or handed it back
// (Released): the timeline's steps say so too.
function markHandovers(history, timeline) {
  for (const row of history.querySelectorAll("tr[data-type='Resumed'], tr[data-type='Released']")) {
    const step = timeline.querySelector(`.step[data-step="${CSS.escape(row.dataset.step)}"] .step-body`);
    const key = `${row.dataset.type}-${row.dataset.version}`;
    if (!step || step.querySelector(`[data-handover="${key}"]`)) continue;
    const text = row.dataset.type === "Resumed"
      ? `${row.dataset.time} handover: ${row.dataset.executor} took the run up at this step`
      : `${row.dataset.time} handover: ${row.dataset.executor} handed the run back (draining)`;
    step.append(el("p", { class: "handover", "data-handover": key }, text));
  }
}

function runPage(container) {
  const history = document.getElementById("history");
  const loadHistory = async () => {
    await loadFragment(history, history.dataset.src);
    markHandovers(history, container);
  };
  const refresh = () => {
    const summary = document.getElementById("summary-box");
    loadFragment(summary, summary.dataset.src);
    if (history) loadHistory();
  };
  if (history) loadHistory();
  new Timeline(container, container.dataset.run, { onEnd: refresh }).follow();
}

function playground() {
  const form = document.getElementById("chat-form");
  const transcript = document.getElementById("transcript");
  const input = document.getElementById("chat-input");
  const note = document.getElementById("chat-conversation");
  let conversation = "";
  let current = null;
  document.getElementById("chat-new").addEventListener("click", () => {
    conversation = "";
    note.textContent = "";
    transcript.replaceChildren();
  });
  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    const body = new FormData();
    body.append("agent", document.getElementById("chat-agent").value);
    body.append("mode", document.getElementById("chat-mode").value);
    body.append("input", text);
    body.append("conversation_id", conversation);
    body.append("request_id", crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random());
    transcript.append(el("div", { class: "message user" }, text));
    input.value = "";
    const response = await fetch("/playground/runs", { method: "POST", body, headers: { "X-CSRF-Token": csrfToken() } });
    const answer = await response.json();
    if (answer.error) {
      transcript.append(el("p", { class: "flash error" }, answer.error));
      return;
    }
    conversation = answer.conversation_id;
    note.replaceChildren("Conversation ", el("code", {}, conversation), " · last run ",
      el("a", { href: `/runs/${answer.run_id}` }, answer.run_id));
    if (current) current.stop();
    const box = el("div", { class: "message agent timeline", "data-run": answer.run_id });
    transcript.append(box);
    current = new Timeline(box, answer.run_id);
    current.follow();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const container of document.querySelectorAll("[data-live]")) followLive(container);
  const timeline = document.getElementById("timeline");
  if (timeline) runPage(timeline);
  if (document.getElementById("chat-form")) playground();
});
