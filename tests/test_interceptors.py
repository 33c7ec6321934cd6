"""HandlerWrapping: each method's handler is wrapped once; unknown methods stay unknown."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.interceptors import AnyHandler, HandlerWrapping


@dataclass(frozen=True)
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


DETAILS_KNOWN = Details("/a.S/Known")
DETAILS_UNKNOWN = Details("/a.S/Unknown")


class Counting(HandlerWrapping):
    def __init__(self) -> None:
        super().__init__()
        self.wrapped_methods: list[str] = []

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        self.wrapped_methods.append(method)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


async def test_a_method_is_wrapped_once_and_an_unknown_one_is_left_to_grpc() -> None:
    served = grpc.unary_unary_rpc_method_handler(lambda request, context: None)

    async def continuation(details: grpc.HandlerCallDetails) -> AnyHandler | None:
        return served if details.method == "/a.S/Known" else None

    interceptor = Counting()
    first = await interceptor.intercept_service(continuation, DETAILS_KNOWN)  # type: ignore[arg-type]
    again = await interceptor.intercept_service(continuation, DETAILS_KNOWN)  # type: ignore[arg-type]
    unknown = await interceptor.intercept_service(continuation, DETAILS_UNKNOWN)  # type: ignore[arg-type]
    assert first is again
    assert first is not served
    assert unknown is None
    assert interceptor.wrapped_methods == ["/a.S/Known"]
