"""Who is calling: the bearer token of a call names its tenant."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc

from common.errors import Unauthenticated
from common.settings import LOCAL_TENANT, ApiKeys


def tenant_of(context: grpc.aio.ServicerContext[Any, Any], keys: ApiKeys) -> str:
    """The caller's tenant. With no keys configured, every caller is the local tenant."""
    if not keys.enabled:
        return LOCAL_TENANT
    token = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthenticated("the authorization metadata must be 'Bearer <api key>'")
            break
    if not token:
        raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <api key>'")
    tenant = keys.tenant_of(token.strip())
    if tenant is None:
        raise Unauthenticated("invalid API key")
    return tenant


Authenticate = Callable[[grpc.aio.ServicerContext[Any, Any]], str]
"""The tenant of a call (or Unauthenticated)."""


def authenticator(keys: ApiKeys) -> Authenticate:
    return functools.partial(tenant_of, keys=keys)
