"""What tracing costs the executor's event loop per durable run: the spans a run makes, alone.

    python -m bench.spans [--runs N] [--rounds N] [--profile]

The spans of a durable run with two model calls and a tool call (start run and store run;
dispatch run; take run, two chat spans, an execute_tool span and three commit run events), made
through the same helpers as the executor's (common.tracing, executor.step_spans,
executor.session.recording, executor.durable.taking) with the real SDK and its batch span
processor exporting over OTLP/gRPC to a receiver in this process (tests.otlp_collector). Prints
the CPU time of this thread per run (``time.thread_time``: the export thread and the receiver
are left out, as is the load of other processes on a shared machine), the least and the median
over the rounds. ``--profile``: a cProfile of the rounds in CPU time instead.
"""

from __future__ import annotations

import argparse
import contextvars
import cProfile
import os
import pstats
import time
from types import SimpleNamespace
from typing import Any

from opentelemetry.trace import SpanKind

from tests.otlp_collector import Collector

GATEWAY_CALL = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


class OneRun:
    """The span work of one durable run (a stand-in for the run and what the helpers read)."""

    def __init__(self) -> None:
        self.run: Any = SimpleNamespace(
            run_id="r" * 26,
            version=3,
            pending_events=[1, 2],
            conversation_id="c" * 26,
            execution_mode="durable",
            trace_context={},
            steps_completed=0,
            attempt_of=lambda step_index: 1,
            arguments_of=lambda call: "{}",
        )
        self.ctx: Any = SimpleNamespace(store=SimpleNamespace(system="postgresql"))
        self.config: Any = SimpleNamespace(model=SimpleNamespace(provider="scripted", name="m"))
        self.request: Any = SimpleNamespace(instructions="", messages=[])
        self.reply: Any = SimpleNamespace(
            finish_reason="stop",
            tool_calls=[],
            usage={"input_tokens": 3, "output_tokens": 4},
            text="x",
        )
        self.call: Any = {"name": "calculator", "id": "call_1"}
        self.dispatch: Any = SimpleNamespace(deliveries=1, recovery=False, trace_context={})

    def __call__(self) -> None:
        # Each part runs in a task of its own in the executor: a context of its own here.
        contextvars.copy_context().run(self.start)
        contextvars.copy_context().run(self.send)
        contextvars.copy_context().run(self.take)

    def start(self) -> None:
        from common import tracing
        from executor.session.recording import store_span

        with tracing.span(
            "start run",
            kind=SpanKind.SERVER,
            parent=tracing.parent_from(GATEWAY_CALL),
            attributes={"agentrun.agent.id": "a", "agentrun.tenant": "t"},
        ) as starting:
            self.run.trace_context = tracing.carrier()
            with store_span(self.ctx, self.run, "store run"):
                pass
            starting.set_attribute("agentrun.run.id", self.run.run_id)
            starting.set_attribute("agentrun.run.mode", "durable")

    def send(self) -> None:
        from common import tracing

        attributes = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": "agentrun.runs",
            "agentrun.run.id": self.run.run_id,
        }
        with tracing.leaf(
            "dispatch run", kind=SpanKind.PRODUCER, attributes=attributes
        ) as dispatching:
            self.dispatch.trace_context = tracing.carrier(dispatching)

    def take(self) -> None:
        from common import tracing
        from executor import step_spans
        from executor.durable.taking import _take_span
        from executor.session.recording import store_span

        run = self.run
        with _take_span(run, self.dispatch, "executor-1") as taking:
            taking.set_attribute("agentrun.step.index", 1)
            taking.set_attribute("agentrun.step.attempt", 1)
        tracing.carry_on(taking)
        for step_index in (1, 2):
            with step_spans.model_call(run, self.config, self.request, step_index, 1) as span:
                step_spans.model_replied(span, self.reply)
            tracing.trace_id()  # a log line
            if step_index == 1:
                with step_spans.tool_call(run, self.call, step_index, 1, 1) as span:
                    step_spans.tool_answered(span, "3", False)
            with store_span(self.ctx, run, "commit run events"):
                pass
        with store_span(self.ctx, run, "commit run events"):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    collector = Collector(keep=False)
    endpoint = collector.start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"

    from common import tracing

    stop = tracing.configure("bench-spans")
    one_run = OneRun()
    try:
        for _ in range(args.runs):  # warm-up
            one_run()
        if args.profile:
            profile = cProfile.Profile(time.thread_time)
            profile.enable()
            for _ in range(args.runs * args.rounds):
                one_run()
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            return
        rounds: list[float] = []
        for _ in range(args.rounds):
            began = time.thread_time()
            for _ in range(args.runs):
                one_run()
            rounds.append((time.thread_time() - began) / args.runs * 1e6)
        rounds.sort()
        print(
            f"span work of a durable run: {rounds[0]:.1f} us CPU at least, "
            f"{rounds[len(rounds) // 2]:.1f} us median ({args.rounds} rounds of {args.runs} runs)"
        )
    finally:
        stop()
        collector.stop()


if __name__ == "__main__":
    main()
