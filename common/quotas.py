"""Per-tenant quotas on starting runs (the settings' part; the store enforces them)."""

from __future__ import annotations

from dataclasses import dataclass

# Seconds a start refused for too many concurrent runs is told to wait: runs end at no
# predictable time, so this is a polite pace for asking again, not a promise.
CONCURRENCY_RETRY_DELAY = 1.0
RATE_WINDOW = 60.0


@dataclass(frozen=True)
class TenantQuotas:
    """0 means no limit."""

    max_concurrent_runs: int = 0
    runs_per_minute: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.max_concurrent_runs or self.runs_per_minute)
