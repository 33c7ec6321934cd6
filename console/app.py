"""The console's ASGI application: routes of every page, the session cookie, error pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from console import agents, approvals, playground, run_page, runs, session
from console.gateway import Gateway, status_message
from console.pages import render

SESSION_COOKIE = "agentrun_console"
SESSION_MAX_AGE = 12 * 3600

_PAGE_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


async def _home(request: Request) -> Response:
    return RedirectResponse("/runs", status_code=303)


async def _not_signed_in(request: Request, exc: Exception) -> Response:
    if request.headers.get("accept", "").startswith("text/event-stream"):
        return Response("sign in first", status_code=401)
    return session.login_redirect(request)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, grpc.aio.AioRpcError)
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        # The key was revoked since sign-in: sign in again.
        session.sign_out(request)
        return session.login_redirect(request)
    status = _PAGE_STATUS.get(exc.code(), 502)
    return render(request, "error.html", {"message": status_message(exc)}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return render(request, "error.html", {"message": exc.detail}, status_code=exc.status_code)


def create_app(gateway: Gateway, secret_key: str, *, https_only: bool = False) -> Starlette:
    """The console for ``gateway``; ``secret_key`` signs the session cookies (sessions end when
    it changes)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.open()
        try:
            yield
        finally:
            await gateway.close()

    app = Starlette(
        routes=[
            Route("/", _home),
            *session.routes,
            *runs.routes,
            *run_page.routes,
            *approvals.routes,
            *agents.routes,
            *playground.routes,
            Mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static"))),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=secret_key,
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_MAX_AGE,
                same_site="lax",
                https_only=https_only,
            )
        ],
        exception_handlers={
            session.NotSignedIn: _not_signed_in,
            grpc.aio.AioRpcError: _gateway_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.key_sealer = session.KeySealer(secret_key)
    return app
