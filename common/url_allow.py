"""AGENTRUN_TOOL_URL_ALLOW: the hosts that agents' tools may call, so that a tenant cannot point
a tool at internal addresses.

Entries are hosts (any port), host:port, or CIDRs. A CIDR matches only a URL whose host is an
IP address written out: a host name is never resolved to be matched against one (a name that
resolves elsewhere by the time of the call would get through), so a name must be listed by
name.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class UrlAllowList:
    """Empty: every URL is allowed (the setting is not set)."""

    hosts: frozenset[str] = frozenset()
    host_ports: frozenset[tuple[str, int]] = frozenset()
    networks: tuple[Network, ...] = ()

    @property
    def restricts(self) -> bool:
        return bool(self.hosts or self.host_ports or self.networks)

    def allows(self, url: str) -> bool:
        if not self.restricts:
            return True
        try:
            parts = urlsplit(url)
            port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        host = (parts.hostname or "").lower()
        if not host:
            return False
        if host in self.hosts or (host, port) in self.host_ports:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    @staticmethod
    def parse(text: str) -> UrlAllowList:
        """The list of a comma-separated setting; raises ValueError naming a malformed entry."""
        hosts: set[str] = set()
        host_ports: set[tuple[str, int]] = set()
        networks: list[Network] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"AGENTRUN_TOOL_URL_ALLOW: {raw!r} is not a CIDR") from None
                continue
            try:
                parts = urlsplit(f"//{entry}")
                port = parts.port
            except ValueError:
                port = None
                parts = None
            if parts is None or not parts.hostname or parts.path or parts.username:
                raise ValueError(
                    f"AGENTRUN_TOOL_URL_ALLOW: {raw!r} is not a host, host:port or CIDR"
                )
            if port is None:
                hosts.add(parts.hostname)
            else:
                host_ports.add((parts.hostname, port))
        return UrlAllowList(frozenset(hosts), frozenset(host_ports), tuple(networks))
