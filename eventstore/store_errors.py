"""Turns the store's infrastructure failures into the domain's Unavailable error: in the use
cases decorated here, and (registered with common.errors) wherever else they are raised."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError

from common.errors import Unavailable, register_unavailable

register_unavailable("database", OperationalError, InterfaceError, psycopg.OperationalError)

P = ParamSpec("P")
R = TypeVar("R")


def translate_store_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Decorates a use case: a database that cannot be reached becomes Unavailable."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable("database", f"the database is unavailable: {exc}") from exc

    return wrapper
