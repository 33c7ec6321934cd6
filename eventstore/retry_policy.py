"""A run's failure policy as data: when a failed call is tried again, and when the run fails.

Modelled on Temporal's RetryPolicy. An agent has one for model calls and one for tool calls; a
run keeps its agent's (pinned in its request), and its state machine reads it
(eventstore.run_steps): the loop only does what the machine decides. A tool may have a policy of
its own; the agent's tool-call policy is the default. A tool's failure is retried only if a retry
may cure it (a connection error, a timeout, HTTP 429 or 5xx); other failures go to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgument

MAX_ATTEMPTS_LIMIT = 100
# The loop waits out a backoff while it holds the run: a wait of hours is not what this is for.
MAX_RETRY_INTERVAL = 600.0
MAX_BACKOFF_COEFFICIENT = 10.0
MAX_ERROR_CODES = 50
MAX_ERROR_CODE_LENGTH = 100


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is tried again.

    ``maximum_attempts`` counts every attempt, the first included (1: never retried). The n-th
    retry waits ``initial_interval * backoff_coefficient ** (n - 1)`` seconds, at most
    ``maximum_interval``. A failure is retried only if its provider says a retry may cure it
    and its code is not in ``non_retryable_error_codes``.
    """

    maximum_attempts: int = 3
    initial_interval: float = 1.0
    backoff_coefficient: float = 2.0
    maximum_interval: float = 30.0
    non_retryable_error_codes: tuple[str, ...] = ()

    def retries(self, code: str, retryable: bool, failed_attempts: int) -> bool:
        """Whether a call that has failed ``failed_attempts`` times, the last time with
        ``code`` (``retryable`` as its provider said), is tried again."""
        return (
            retryable
            and code not in self.non_retryable_error_codes
            and failed_attempts < self.maximum_attempts
        )

    def interval(self, retry: int) -> float:
        """Seconds to wait before the ``retry``-th retry (1: the second attempt)."""
        return min(
            self.initial_interval * self.backoff_coefficient ** (retry - 1),
            self.maximum_interval,
        )

    def validate(self, field: str) -> None:
        """Raises InvalidArgument naming the first field of the policy that is out of bounds."""
        if not 1 <= self.maximum_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidArgument(
                f"{field}.maximum_attempts", f"must be between 1 and {MAX_ATTEMPTS_LIMIT}"
            )
        for name, seconds in (
            ("initial_interval", self.initial_interval),
            ("maximum_interval", self.maximum_interval),
        ):
            if not math.isfinite(seconds) or not 0 < seconds <= MAX_RETRY_INTERVAL:
                raise InvalidArgument(
                    f"{field}.{name}",
                    f"must be positive and at most {MAX_RETRY_INTERVAL:g} seconds",
                )
        if self.maximum_interval < self.initial_interval:
            raise InvalidArgument(
                f"{field}.maximum_interval", "must not be shorter than initial_interval"
            )
        if not 1.0 <= self.backoff_coefficient <= MAX_BACKOFF_COEFFICIENT:
            raise InvalidArgument(
                f"{field}.backoff_coefficient",
                f"must be between 1 and {MAX_BACKOFF_COEFFICIENT:g}",
            )
        codes = self.non_retryable_error_codes
        if len(codes) > MAX_ERROR_CODES or not all(
            0 < len(code) <= MAX_ERROR_CODE_LENGTH for code in codes
        ):
            raise InvalidArgument(
                f"{field}.non_retryable_error_codes",
                f"must be at most {MAX_ERROR_CODES} codes of 1 to "
                f"{MAX_ERROR_CODE_LENGTH} characters",
            )

    def to_json(self) -> dict[str, Any]:
        # Written out: dataclasses.asdict deep-copies field by field, and this runs per run.
        return {
            "maximum_attempts": self.maximum_attempts,
            "initial_interval": self.initial_interval,
            "backoff_coefficient": self.backoff_coefficient,
            "maximum_interval": self.maximum_interval,
            "non_retryable_error_codes": list(self.non_retryable_error_codes),  # JSON-native
        }

    @staticmethod
    def from_json(data: dict[str, Any], default: RetryPolicy) -> RetryPolicy:
        """The policy of ``data``; what it lacks is ``default``'s."""
        codes: Sequence[str] = data.get(
            "non_retryable_error_codes", default.non_retryable_error_codes
        )
        return RetryPolicy(
            maximum_attempts=int(data.get("maximum_attempts", default.maximum_attempts)),
            initial_interval=float(data.get("initial_interval", default.initial_interval)),
            backoff_coefficient=float(data.get("backoff_coefficient", default.backoff_coefficient)),
            maximum_interval=float(data.get("maximum_interval", default.maximum_interval)),
            non_retryable_error_codes=tuple(codes),
        )


# Model calls fail now and then (rate limits, overloaded servers, dropped streams): a few quick
# retries save the run. Tool calls are not retried unless their agent says so.
DEFAULT_MODEL_RETRY_POLICY = RetryPolicy()
DEFAULT_TOOL_RETRY_POLICY = RetryPolicy(maximum_attempts=1)
