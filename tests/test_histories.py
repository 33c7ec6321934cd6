"""tests.histories: what counts as a history that disagrees with the run list."""

from __future__ import annotations

from agentrun.v1 import run_pb2
from tests.histories import Ended, disagreement


def text(sequence: int) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(sequence=sequence, text_delta=run_pb2.TextDelta(text="t"))


def completed(sequence: int, output: str = "done") -> run_pb2.RunEvent:
    return run_pb2.RunEvent(sequence=sequence, run_completed=run_pb2.RunCompleted(output=output))


def lost(sequence: int) -> run_pb2.RunEvent:
    error = run_pb2.RunError(code=run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST)
    return run_pb2.RunEvent(sequence=sequence, run_failed=run_pb2.RunFailed(error=error))


DONE = Ended("r", "completed", "done", "")


def test_a_whole_history_that_ends_as_the_run_list_says_agrees() -> None:
    assert disagreement(DONE, [text(1), text(2), completed(3)]) is None
    assert disagreement(Ended("r", "failed", "", "EXECUTOR_LOST"), [text(1), lost(2)]) is None
    assert disagreement(DONE, []) is None  # nothing retained: nothing to tell


def test_every_way_of_disagreeing_is_named() -> None:
    assert "not 1..3" in (disagreement(DONE, [text(1), text(3), completed(4)]) or "")
    assert "terminal" in (disagreement(DONE, [text(1), completed(2), completed(3)]) or "")
    assert "ends with text_delta" in (disagreement(DONE, [text(1), text(2)]) or "")
    assert "says completed" in (disagreement(DONE, [text(1), lost(2)]) or "")
    assert "output differs" in (disagreement(DONE, [text(1), completed(2, "other")]) or "")
    failed = Ended("r", "failed", "", "MODEL_ERROR")
    assert "says MODEL_ERROR" in (disagreement(failed, [text(1), lost(2)]) or "")
