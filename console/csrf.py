"""The CSRF token of every form: one per session, checked before a post does anything."""

from __future__ import annotations

import secrets

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_CSRF = "csrf"
_REFUSED = "refused: the form has no valid CSRF token; reload the page"


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get(_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session[_CSRF] = token
    return token


async def checked_form(request: Request) -> FormData:
    """The posted form, if it carries the session's CSRF token (as a field or, from fetch, as
    the X-CSRF-Token header); 403 otherwise."""
    form = await request.form()
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    expected = request.session.get(_CSRF)
    if not (isinstance(sent, str) and isinstance(expected, str)):
        raise HTTPException(403, _REFUSED)
    if not secrets.compare_digest(sent.encode(), expected.encode()):
        raise HTTPException(403, _REFUSED)
    return form
