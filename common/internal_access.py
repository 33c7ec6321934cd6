"""Who may call an executor: only the gateways (and tools) of this deployment.

An executor serves any tenant its caller names, so its port must refuse strangers. Two ways,
either or both:

- mTLS (AGENTRUN_INTERNAL_TLS_CA, _CERT, _KEY): the executor serves TLS and requires a client
  certificate of the internal CA; gateways present theirs and check the executor's;
- a shared secret (AGENTRUN_INTERNAL_TOKEN): gateways send it in the call metadata
  ``agentrun-internal-token``; the executor compares it in constant time and answers
  UNAUTHENTICATED without it. Health checks need no token (they reveal nothing).

With neither, an executor listens only on a loopback address (``agentrun up``, the tests): one
listening on any other address refuses to start.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

import grpc

from common import errors
from common.interceptors import AnyHandler, Continuation, HandlerWrapping, ServerInterceptor
from common.rpc import abort_with
from common.settings import ConfigurationError, Settings
from common.tls import channel_credentials, server_credentials

TOKEN_METADATA = "agentrun-internal-token"
OPEN_METHODS = ("/grpc.health.v1.Health/",)
Metadata = tuple[tuple[str, str], ...]


def is_loopback(listen: str) -> bool:
    """Whether ``listen`` (host:port, [v6]:port or unix:path) is reachable from this machine
    only."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def executor_server_security(
    settings: Settings,
) -> tuple[grpc.ServerCredentials | None, list[ServerInterceptor]]:
    """The executor's credentials (None: plaintext) and interceptors; ConfigurationError when
    its port would be open to the network."""
    if settings.internal_tls is None and not settings.internal_token:
        if not is_loopback(settings.executor_listen):
            raise ConfigurationError(
                f"the executor would listen on {settings.executor_listen} without "
                "authenticating its callers: set AGENTRUN_INTERNAL_TLS_CA, _CERT and _KEY "
                "(mTLS) or AGENTRUN_INTERNAL_TOKEN on the executors and their gateways, or "
                "listen on a loopback address"
            )
        return None, []
    credentials = (
        server_credentials(settings.internal_tls) if settings.internal_tls is not None else None
    )
    interceptors: list[ServerInterceptor] = (
        [InternalToken(settings.internal_token)] if settings.internal_token else []
    )
    return credentials, interceptors


def internal_channel(
    settings: Settings, target: str, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A channel to executors: mTLS when configured, else plaintext."""
    tls = settings.internal_tls
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, channel_credentials(tls.ca, tls.cert, tls.key), options=options
    )


def internal_metadata(settings: Settings) -> Metadata:
    """What every call to an executor carries besides its own metadata."""
    return ((TOKEN_METADATA, settings.internal_token),) if settings.internal_token else ()


class InternalToken(HandlerWrapping):
    """Refuses, with UNAUTHENTICATED, every call but health checks without the shared secret."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token.encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> AnyHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS) or self._carries_token(handler_call_details):
            return await continuation(handler_call_details)
        return await self.wrapped(continuation, handler_call_details)

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        return _refusal(handler)

    def _carries_token(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._token)
        return False


REFUSED = (
    f"this is an executor's internal port: a call needs the deployment's internal token "
    f"({TOKEN_METADATA}); clients call a gateway"
)


def _refusal(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await abort_with(context, errors.Unauthenticated(REFUSED))

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
