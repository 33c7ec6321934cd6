"""Agents as last read, for the first-token path, kept current by change notices on NATS.

Every change to an agent (through any executor) is announced on ``<namespace>.agents.changed``
before its RPC answers; every executor drops its copy on the notice, so a run started after an
update uses the new version (bar the time a notice takes to cross NATS, a millisecond or so).
The cache is used only while NATS is connected, is emptied after a reconnection (notices may
have been missed meanwhile), and its entries expire after ``ttl`` seconds all the same. Reading
an agent otherwise costs a query of the store on every run start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import nats.errors
from nats.aio.msg import Msg

from common.errors import Unavailable
from common.nats_link import NatsLink
from eventstore.agent_config import AgentConfig

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000


class AgentCache:
    def __init__(self, link: NatsLink, ttl: float = 30.0) -> None:
        self._link = link
        self._ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, AgentConfig]] = {}
        self._notices = 0
        link.on_reconnected(self._forget_all)

    async def start(self) -> None:
        await self._link.subscribe(self._link.names.agent_changes_subject, self._on_notice)

    def get(self, tenant: str, agent_id: str) -> AgentConfig | None:
        if not self._link.is_connected:
            return None
        entry = self._entries.get((tenant, agent_id))
        if entry is None or time.monotonic() - entry[0] > self._ttl:
            return None
        return entry[1]

    def token(self) -> int:
        """Take one before reading an agent from the store, and give it to ``put``."""
        return self._notices

    def put(self, tenant: str, config: AgentConfig, token: int) -> None:
        """Keeps ``config``, read from the store after ``token`` was taken, unless a change was
        announced meanwhile (the read may predate it) or NATS is down (no notices then)."""
        if not self._link.is_connected or token != self._notices:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[(tenant, config.agent_id)] = (time.monotonic(), config)

    async def announce_change(self, tenant: str, agent_id: str) -> None:
        """Tells every executor (this one included) that the agent changed."""
        self._notices += 1
        self._entries.pop((tenant, agent_id), None)
        notice = json.dumps({"tenant": tenant, "agent_id": agent_id}).encode()
        with contextlib.suppress(Unavailable, nats.errors.Error, TimeoutError):
            await self._link.nc.publish(self._link.names.agent_changes_subject, notice)
            await self._link.flush(wait=1)

    async def _on_notice(self, msg: Msg) -> None:
        self._notices += 1
        try:
            notice = json.loads(msg.data)
            self._entries.pop((str(notice["tenant"]), str(notice["agent_id"])), None)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed agent change notice")
            self._entries.clear()

    def _forget_all(self) -> None:
        self._notices += 1
        self._entries.clear()
