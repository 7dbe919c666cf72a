"""Who an anonymous rate-limited request counts against: the client's address.

A verified caller (an API key, checked by the access layer before the limiter runs) counts as
its key (server/http/auth.py's `Principal.identity`); nothing a client merely sends makes an
identity of its own here, so an invented key can never buy a fresh budget. X-Forwarded-For /
Forwarded are believed only when the socket peer is a trusted proxy; IPv6 clients are grouped
by their network prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping


class ClientIdentity:
    """Who an anonymous request counts against: the client IP.

    X-Forwarded-For / Forwarded are believed only when the socket peer is a trusted proxy,
    and then walked right to left past trusted hops: the first untrusted address is the
    client. A header from an untrusted peer changes nothing. IPv6 clients are grouped by
    their /ipv6_prefix network (one host usually owns a whole /64).
    """

    def __init__(self, trusted_proxies: Iterable[str], ipv6_prefix: int = 64) -> None:
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self._trusted_memo: dict[str, bool] = {}

    def is_trusted(self, address: str) -> bool:
        known = self._trusted_memo.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self.trusted)
            if len(self._trusted_memo) >= 4096:
                self._trusted_memo.clear()
            self._trusted_memo[address] = known
        return known

    def client_ip(self, headers: Mapping[str, str], peer: str | None) -> str:
        if peer is None or not self.trusted or not self.is_trusted(peer):
            return peer or "unknown"
        hops = _forwarded_for(headers)
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def identify(self, headers: Mapping[str, str], peer: str | None) -> str:
        ip = self.client_ip(headers, peer)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:  # not an address (a proxy's "unknown", say): keyed by its digest
            return "raw:" + hashlib.sha256(ip.encode(errors="replace")).hexdigest()[:32]
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return f"ip:{addr.ipv4_mapped}"
            net = ipaddress.ip_network(f"{addr}/{self.ipv6_prefix}", strict=False)
            return f"ip:{net.network_address}/{self.ipv6_prefix}"
        return f"ip:{addr}"


def _strip_port(value: str) -> str:
    value = value.strip().strip('"')
    if value.startswith("["):  # [2001:db8::1]:4711
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:  # 192.0.2.1:4711
        return value.split(":", 1)[0]
    return value


def _forwarded_for(headers: Mapping[str, str]) -> list[str]:
    """Addresses from X-Forwarded-For, else from RFC 7239 Forwarded `for=`, left to right."""
    xff = headers.get("X-Forwarded-For")
    if xff:
        return [_strip_port(h) for h in xff.split(",") if h.strip()]
    fwd = headers.get("Forwarded")
    if not fwd:
        return []
    out = []
    for element in fwd.split(","):
        for pair in element.split(";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "for" and value:
                out.append(_strip_port(value))
    return out
