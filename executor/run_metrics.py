"""What a run tells the metrics (common.metrics), in the metrics' bounded labels."""

from __future__ import annotations

from common import metrics
from eventstore.run import Run


def agent_of(run: Run) -> str:
    return str(run.agent.get("agent_id", ""))


def started(run: Run) -> None:
    metrics.run_started(run.execution_mode, agent_of(run))


def ended(run: Run) -> None:
    """The run's end was recorded here."""
    code = run.error["code"] if run.error is not None else ""
    metrics.run_ended(
        run.execution_mode, agent_of(run), run.status, code, run.created_on.timestamp()
    )
