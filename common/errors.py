"""Typed domain errors. Each carries structured fields; common.rpc maps them to gRPC statuses.

Domain code raises these and nothing else for expected failures; anything else reaching a
servicer is a bug and becomes INTERNAL.
"""

from __future__ import annotations


class AgentrunError(Exception):
    """Base of the expected failures. ``reason`` is a stable UPPER_SNAKE_CASE identifier."""

    reason = "AGENTRUN_ERROR"
    retry_delay: float | None = None  # seconds after which the client may try again

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def metadata(self) -> dict[str, str]:
        """Structured fields, sent to clients as google.rpc.ErrorInfo metadata."""
        return {}


class NotFound(AgentrunError):
    """The resource does not exist for this tenant (other tenants' resources look the same)."""

    reason = "NOT_FOUND"

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id!r} not found")
        self.kind = kind
        self.resource_id = resource_id

    def metadata(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.resource_id}


class AlreadyExists(AgentrunError):
    reason = "ALREADY_EXISTS"

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id!r} already exists")
        self.kind = kind
        self.resource_id = resource_id

    def metadata(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.resource_id}


class InvalidArgument(AgentrunError):
    """A request field is wrong; ``field`` names it (dotted path)."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def metadata(self) -> dict[str, str]:
        return {"field": self.field}


class FailedPrecondition(AgentrunError):
    """The request is well formed but the resource is not in a state that allows it."""

    reason = "FAILED_PRECONDITION"


class Conflict(AgentrunError):
    """A concurrent change won (optimistic concurrency); the caller may read again and retry."""

    reason = "CONFLICT"


class Unauthenticated(AgentrunError):
    reason = "UNAUTHENTICATED"


class Unavailable(AgentrunError):
    """A dependency (database, NATS, executor) cannot be reached right now; retrying may help."""

    reason = "UNAVAILABLE"

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(message)
        self.dependency = dependency

    def metadata(self) -> dict[str, str]:
        return {"dependency": self.dependency}


class OutOfRange(AgentrunError):
    """A position (sequence, version) lies outside what exists or is still retained."""

    reason = "OUT_OF_RANGE"


class ResourceExhausted(AgentrunError):
    """A limit was reached (a tenant's quota); the call may succeed after ``retry_delay``
    seconds (sent to clients as google.rpc.RetryInfo)."""

    def __init__(self, reason: str, message: str, retry_delay: float, limit: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_delay = retry_delay
        self.limit = limit

    def metadata(self) -> dict[str, str]:
        return {"limit": str(self.limit)}


class Unimplemented(AgentrunError):
    reason = "UNIMPLEMENTED"


class Internal(AgentrunError):
    """A bug: the message names the exception, never its details."""

    reason = "INTERNAL"


# Exceptions of dependencies' libraries that mean the dependency cannot be reached right now:
# the module that uses a library registers them, and common.rpc answers them as that
# dependency's Unavailable wherever they are raised (no call site has to translate them).
_UNAVAILABLE_WHEN: dict[type[BaseException], tuple[str, str]] = {}


def register_unavailable(
    dependency: str, *types: type[BaseException], named: str | None = None
) -> None:
    """Declares that ``types`` raised anywhere mean ``dependency`` is unavailable (``named``:
    how messages name it; "the <dependency>" by default)."""
    for cls in types:
        _UNAVAILABLE_WHEN[cls] = (dependency, named or f"the {dependency}")


def as_agentrun_error(exc: BaseException) -> AgentrunError | None:
    """``exc`` as a domain error: itself, the Unavailable of a registered dependency failure,
    or None (a bug)."""
    if isinstance(exc, AgentrunError):
        return exc
    for cls in type(exc).__mro__:
        registered = _UNAVAILABLE_WHEN.get(cls)
        if registered is not None:
            dependency, named = registered
            return Unavailable(dependency, f"{named} is unavailable: {exc}")
    return None
