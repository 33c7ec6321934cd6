"""Cancellation that Python 3.11's ``asyncio.wait_for`` lost.

On Python 3.11, ``wait_for`` returns the result, and swallows the cancellation, when the task
is cancelled just as the awaited future completes. nats-py waits for every request and every
``next_msg`` with ``wait_for``, so a task cancelled during one (a stream whose client went
away) can carry on as if nothing happened, and never end. The task still counts the request
(``Task.cancelling``): ``raise_if_cancelled`` after such an await ends it as it was asked.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raises CancelledError if the current task was cancelled and has not taken it back."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
