"""Fan-out fetching of many URLs at once through the app's one ClientSession, SSRF-safe.

The guard sits where connections are made: a resolver that checks every address a name
resolves to (so DNS rebinding cannot slip a private address in after a check), plus a check
of IP-literal hosts (aiohttp does not ask the resolver for those). Redirects are followed by
hand, at most `max_redirects`, each hop checked again. Bodies are read with a cap that counts
decompressed bytes: we decompress ourselves, bounded, so a gzip bomb stops at the cap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

# Ranges that ipaddress does not already flag as non-global but that must never be fetched.
_EXTRA_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "100.64.0.0/10",  # CGNAT (shared address space)
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255
        "ff00::/8",  # IPv6 multicast
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def blocked_reason(ip: Address) -> str | None:
    """Why fetching from `ip` is refused (loopback, private, ...), or None when it is public.

    IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by the
    IPv4 address inside them.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.sixtofour is not None:
            embedded = ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None:
            return blocked_reason(embedded)
    for name in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name
    if any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version):
        return "reserved"
    if not ip.is_global:
        return "not global"
    return None


class BlockedAddress(OSError):
    """The destination is not allowed (SSRF guard)."""


class Guard:
    """Allow-list (CIDRs and host names) in front of blocked_reason()."""

    def __init__(self, allow: Iterable[str]) -> None:
        nets, hosts = [], set()
        for item in allow:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        self.allowed_nets = tuple(nets)
        self.allowed_hosts = frozenset(hosts)

    def check_address(self, host: str, address: str) -> None:
        if host.lower().rstrip(".") in self.allowed_hosts:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in net for net in self.allowed_nets if net.version == ip.version):
            return
        reason = blocked_reason(ip)
        if reason is not None:
            raise BlockedAddress(f"{host} resolves to {ip} ({reason})")


class GuardedResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then refuses any blocked address."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            self._guard.check_address(host, r["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|\d+)(\.(0x[0-9a-f]+|\d+)){0,3}$", re.IGNORECASE)


def literal_ip(host: str) -> Address | None:
    """The address an IP-literal host denotes, including the old numeric spellings that
    resolvers still honour (2130706433, 0x7f000001, 0177.0.0.1, 127.1)."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@dataclass(frozen=True, slots=True)
class FetchLimits:
    timeout: float
    connect_timeout: float
    max_bytes: int
    max_redirects: int
    concurrency: int
    deadline: float


class TooLarge(Exception):
    pass


# Pacing of one request's fan-out (see fetch_all). Pieces of a body smaller than this are taken
# in at once; a compressed piece always waits its turn, since it may inflate to max_bytes.
_PACED_PIECE = 16 * 1024
# Fetches started per event-loop pass. A hundred started in one pass (URL checks, connection,
# request each) held the loop for 20-48 ms in bench.fanout; 5 per pass measured better than 10.
_STARTS_PER_PASS = 5


async def _read_capped(
    resp: aiohttp.ClientResponse, max_bytes: int, gate: asyncio.Lock | None = None
) -> bytes:
    """The decoded body, at most max_bytes; TooLarge beyond (compressed bodies included).

    With a `gate` (shared by the fetches of one request), each piece is taken in while holding
    it and the loop gets a pass before the next: the request's bodies come in one piece
    (at most ~250 KB, what the loop reads from a socket at once) per pass, not a hundred."""
    coding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if coding in ("gzip", "x-gzip"):
        decoder: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == "deflate":
        decoder = zlib.decompressobj()
    elif coding in ("identity", ""):
        decoder = None
    else:
        raise ValueError(f"unsupported Content-Encoding {coding!r}")
    parts: list[bytes] = []
    size = 0

    def take(chunk: bytes) -> None:
        nonlocal size
        if decoder is None:
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge
            parts.append(chunk)
            return
        data = chunk
        while data:
            # max_length bounds what one call may inflate: a bomb never gets the chance
            out = decoder.decompress(data, max_bytes + 1 - size)
            size += len(out)
            if size > max_bytes:
                raise TooLarge
            parts.append(out)
            data = decoder.unconsumed_tail

    # iter_chunks hands over the pieces as the connection received them (no slicing, no copy).
    # While a piece waits for the gate nothing more is consumed, so the connection's buffer
    # stays over its high-water mark and aiohttp stops reading that socket: the pacing holds
    # back the socket reads too, not only this loop.
    async for chunk, _ in resp.content.iter_chunks():
        if not chunk:
            continue
        if gate is None or (decoder is None and len(chunk) < _PACED_PIECE):
            take(chunk)
        else:
            async with gate:
                take(chunk)
                await asyncio.sleep(0)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decode(body: bytes, content_type: str, charset: str | None) -> Any:
    if content_type == "application/json" or content_type.endswith("+json"):
        orjson.loads(body)  # validate only: the answer embeds the upstream's bytes as they are
        return orjson.Fragment(body)
    if content_type.startswith("text/") or content_type in ("application/xml", "application/yaml", ""):
        return body.decode(charset or "utf-8", errors="replace")
    return None  # binary: reported by size only


def _categorise(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "blocked" if isinstance(exc.os_error, BlockedAddress) else "dns"
    if isinstance(exc, BlockedAddress):
        return "blocked"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "blocked" if isinstance(exc.os_error, BlockedAddress) else "refused"
    if isinstance(exc, TooLarge):
        return "too_large"
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return "invalid"
    return "connection"


# One result of fetch_one() (or fetch_all()'s overall deadline), for the API document.
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url", "status", "elapsed_ms"],
    "properties": {
        "url": {},
        "status": {"type": ["integer", "null"]},
        "elapsed_ms": {"type": "number"},
        "content_type": {"type": "string"},
        "bytes": {"type": "integer"},
        "data": {},
        # _categorise()'s kinds and fetch_one()'s own
        "error": {
            "enum": [
                "timeout",
                "dns",
                "refused",
                "too_large",
                "blocked",
                "tls",
                "http_error",
                "invalid",
                "connection",
            ]
        },
        "detail": {"type": "string"},
    },
}


async def fetch_one(
    session: aiohttp.ClientSession,
    guard: Guard,
    raw_url: Any,
    limits: FetchLimits,
    cpu_gate: asyncio.Lock | None = None,
) -> dict[str, Any]:
    """Fetch one URL; never raises for anything the URL or its server does.

    `cpu_gate`, shared by the fetches of one request, paces the reading of bodies (one piece
    per event-loop pass, see _read_capped) and serialises the decoding of large ones (a 1 MiB
    JSON takes ~1.5 ms to check) with a pass after each, so a hundred bodies arriving together
    cannot hold the loop for the sum of their work: other requests are served in between.
    """
    started = time.perf_counter()
    result: dict[str, Any] = {"url": raw_url, "status": None}

    def done(**fields: Any) -> dict[str, Any]:
        result.update(fields)
        result["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result

    if not isinstance(raw_url, str):
        return done(error="invalid", detail="not a string")
    try:
        url = URL(raw_url.strip())
    except (ValueError, TypeError):
        return done(error="invalid", detail="not a URL")
    timeout = aiohttp.ClientTimeout(total=limits.timeout, connect=limits.connect_timeout)
    try:
        async with asyncio.timeout(limits.timeout):
            for _hop in range(limits.max_redirects + 1):
                if url.scheme not in ("http", "https") or not url.host:
                    return done(error="invalid", detail="only absolute http and https URLs are fetched")
                ip = literal_ip(url.host)
                if ip is not None:
                    guard.check_address(url.host, str(ip))
                async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = url.join(URL(resp.headers["Location"]))
                        continue
                    body = await _read_capped(resp, limits.max_bytes, cpu_gate)
                    ctype = resp.content_type
                    fields: dict[str, Any] = {
                        "status": resp.status,
                        "content_type": ctype,
                        "bytes": len(body),
                    }
                    if resp.status >= 400:
                        return done(**fields, error="http_error", detail=resp.reason or "")
                    try:
                        if cpu_gate is None or len(body) < 64 * 1024:
                            data = _decode(body, ctype, resp.charset)
                        else:
                            async with cpu_gate:
                                data = _decode(body, ctype, resp.charset)
                                await asyncio.sleep(0)
                    except orjson.JSONDecodeError:
                        return done(**fields, error="invalid", detail="declared JSON but is not")
                    return done(**fields, data=data)
            return done(error="http_error", detail=f"more than {limits.max_redirects} redirects")
    except asyncio.CancelledError:
        raise
    except BlockedAddress as exc:
        return done(error="blocked", detail=str(exc))
    except Exception as exc:
        category = _categorise(exc)
        detail = (
            str(exc.os_error)
            if isinstance(exc, aiohttp.ClientConnectorError)
            else (str(exc) or type(exc).__name__)
        )
        return done(error=category, detail=detail[:200])


async def fetch_all(
    session: aiohttp.ClientSession, guard: Guard, urls: Sequence[Any], limits: FetchLimits
) -> list[dict[str, Any]]:
    """Fetch every URL concurrently (at most `limits.concurrency` at once), results in order.

    URLs still running at the overall deadline are reported as timeouts. The fetches are
    started `_STARTS_PER_PASS` per event-loop pass and share one gate that paces their bodies,
    so that however many URLs a request names, the loop stays free for other requests.
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + limits.deadline
    sem = asyncio.Semaphore(limits.concurrency)
    cpu_gate = asyncio.Lock()

    async def one(u: Any) -> dict[str, Any]:
        async with sem:
            return await fetch_one(session, guard, u, limits, cpu_gate)

    tasks: list[asyncio.Task[dict[str, Any]]] = []
    try:
        for i, u in enumerate(urls):
            if i and i % _STARTS_PER_PASS == 0:
                await asyncio.sleep(0)  # the ones started so far send their requests first
            tasks.append(asyncio.ensure_future(one(u)))
        if not tasks:
            return []
        finished, _ = await asyncio.wait(tasks, timeout=max(0.0, give_up_at - loop.time()))
    finally:
        # at the deadline, and if this request itself is cancelled: no fetch outlives it
        left = [t for t in tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
    out = []
    for u, task in zip(urls, tasks, strict=True):
        if task in finished and not task.cancelled() and task.exception() is None:
            out.append(task.result())
        else:
            out.append({"url": u, "status": None, "error": "timeout", "detail": "overall deadline reached"})
    return out
