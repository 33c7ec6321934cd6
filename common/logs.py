"""The services' logs: plain text (the default) or one JSON object a line
(AGENTRUN_LOG_FORMAT=json), and the run a line is about.

A run's session sets ``about_run`` in the task that holds the run; every line logged in that
task (and in the tasks it starts) then names the run: its run_id, tenant and agent, as JSON
fields, or ``[run_id=...]`` after a text line. With tracing on, a line also names its trace
(``trace_id``: the current span's, or the trace of the run it is about), so that logs and traces
join.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from dataclasses import dataclass

from common import tracing

LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class RunLabels:
    run_id: str
    tenant: str
    agent: str
    trace_id: str = ""


_about: contextvars.ContextVar[RunLabels | None] = contextvars.ContextVar(
    "agentrun_run", default=None
)


def about_run(run_id: str, tenant: str, agent: str, trace_id: str = "") -> None:
    """Lines logged from here on in this task (and tasks it starts) are about this run (whose
    trace is ``trace_id``, if it is traced)."""
    _about.set(RunLabels(run_id, tenant, agent, trace_id))


class RunFilter(logging.Filter):
    """Puts the run a line is about on the record (``run``: None when it is about none), and
    its trace (``trace_id``: "" when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "run"):
            record.run = _about.get()
        if not hasattr(record, "trace_id"):
            run: RunLabels | None = getattr(record, "run", None)
            record.trace_id = tracing.trace_id() or (run.trace_id if run is not None else "")
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        run: RunLabels | None = getattr(record, "run", None)
        if run is None:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        trace_id = getattr(record, "trace_id", "")
        traced = f" trace_id={trace_id}" if trace_id else ""
        return f"{first} [run_id={run.run_id}{traced}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        run: RunLabels | None = getattr(record, "run", None)
        if run is not None:
            line |= {"run_id": run.run_id, "tenant": run.tenant, "agent": run.agent}
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """Logs to stderr at ``level`` in ``log_format`` (text or json)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"AGENTRUN_LOG_FORMAT is text or json, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RunFilter())
    logging.basicConfig(level=level, handlers=[handler])
