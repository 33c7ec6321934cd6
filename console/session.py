"""Signing in with an API key, and the calls made with it.

The key lives only in the session cookie, encrypted (whoever reads the cookie cannot read the
key) and signed, HttpOnly (the browser's JavaScript never sees it), and in the metadata of the
gRPC calls made for its session.
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import quote

import grpc
from cryptography.fernet import Fernet, InvalidToken
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from agentrun.v1 import agent_service_pb2
from console.csrf import checked_form
from console.gateway import CALL_TIMEOUT, GatewayCalls, status_message
from console.pages import gateway_of, render

_KEY = "api_key"
_SIGNED_IN = "signed_in"


class NotSignedIn(Exception):
    """The request needs a signed-in session (the app sends the browser to the login page)."""


class KeySealer:
    """Encrypts API keys for the session cookie with a key derived from the console's secret."""

    def __init__(self, secret: str) -> None:
        digest = hashlib.sha256(b"agentrun-console-api-key\0" + secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def seal(self, api_key: str) -> str:
        return self._fernet.encrypt(api_key.encode()).decode()

    def open(self, sealed: str) -> str:
        """The key; InvalidToken if it was not sealed with this secret."""
        return self._fernet.decrypt(sealed.encode()).decode()


def _sealer(request: Request) -> KeySealer:
    sealer: KeySealer = request.app.state.key_sealer
    return sealer


def user_calls(request: Request) -> GatewayCalls:
    """The gateway's services with the signed-in user's key; NotSignedIn without one."""
    sealed = request.session.get(_KEY)
    if not request.session.get(_SIGNED_IN) or not isinstance(sealed, str):
        raise NotSignedIn()
    try:
        key = _sealer(request).open(sealed)
    except InvalidToken:
        raise NotSignedIn() from None
    return gateway_of(request).calls(key or None)


def sign_out(request: Request) -> None:
    request.session.clear()


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def safe_next(target: str) -> str:
    """Only paths of this console (no other site: not //host nor a scheme)."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/runs"


async def login_page(request: Request) -> Response:
    return render(request, "login.html", {"next": safe_next(request.query_params.get("next", ""))})


async def login(request: Request) -> Response:
    form = await checked_form(request)
    key = str(form.get("api_key", "")).strip()
    target = safe_next(str(form.get("next", "")))
    calls = gateway_of(request).calls(key or None)
    try:
        # Any call the key must pass: the gateway says whether it knows the key.
        await calls.agents.ListAgents(
            agent_service_pb2.ListAgentsRequest(page_size=1),
            metadata=calls.metadata,
            timeout=CALL_TIMEOUT,
        )
    except grpc.aio.AioRpcError as error:
        refused = error.code() == grpc.StatusCode.UNAUTHENTICATED
        message = "The gateway refused this API key." if refused else "The gateway did not answer: "
        if not refused:
            message += status_message(error)
        context = {"next": target, "error": message}
        return render(request, "login.html", context, status_code=401 if refused else 503)
    sign_out(request)  # a new session: a fresh CSRF token too
    request.session[_KEY] = _sealer(request).seal(key)
    request.session[_SIGNED_IN] = True
    return RedirectResponse(target, status_code=303)


async def logout(request: Request) -> Response:
    await checked_form(request)
    sign_out(request)
    return RedirectResponse("/login", status_code=303)


routes = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
