"""Response compression: Accept-Encoding negotiation (RFC 9110 section 12.5.3), which media
types are worth compressing, and the per-app state the compression middleware and the streams
share (levels, the compressed-body cache, ETags of kept bodies).

The codecs themselves (gzip through isal, zlib-ng or zlib; br; zstd) and the request-body
decoders are server/http/codings.py's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, istr

from server.config import CompressionConfig
from server.http.codings import IDENTITY, Levels, StreamEncoder, available, compress
from server.http.conditional import etag_of
from server.http.negotiation import q_value

MAX_HEADER = 1024  # longer Accept-Encoding headers are cut here: bounded work per request
MAX_CODINGS = 32
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_DEFAULT_LEVELS = Levels()  # one shared default, as the argument default was


@dataclass(frozen=True, slots=True)
class Choice:
    """What to send: `coding` (None = identity), and whether identity is acceptable at all."""

    coding: str | None
    identity_ok: bool = True


IDENTITY_CHOICE = Choice(None, True)


def parse_accept_encoding(header: str) -> dict[str, float]:
    """coding (lower case) -> q. Malformed entries are skipped, never fatal; a q outside 0..1
    or not a number drops that entry; the highest q wins when a coding repeats."""
    out: dict[str, float] = {}
    for part in header[:MAX_HEADER].split(",", MAX_CODINGS)[:MAX_CODINGS]:
        pieces = part.split(";")
        coding = pieces[0].strip().lower()
        if not coding or not _TOKEN.match(coding):
            continue
        q = q_value(pieces[1:])
        if q is not None:
            out[coding] = max(q, out.get(coding, -1.0))
    return out


def choose_encoding(header: str | None, order: Sequence[str]) -> Choice:
    """The best coding in `order` (server preference) by the client's q, ties to the earlier
    one in `order`. No header means identity only (RFC 9110: any coding is acceptable, but
    sending one unasked breaks clients); `*` covers codings not named."""
    if header is None:
        return IDENTITY_CHOICE
    accepted = parse_accept_encoding(header)
    if not accepted:
        # empty (or wholly malformed) header: "no coding is preferred" -> identity
        return IDENTITY_CHOICE
    star = accepted.get("*")
    best, best_q = None, 0.0
    for coding in order:
        q = accepted.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    identity_q = accepted.get(IDENTITY, star if star is not None else 1.0)
    identity_ok = identity_q > 0
    # identity wins over a coding the client likes less (e.g. "gzip;q=0.2, identity")
    if best is not None and identity_ok and IDENTITY in accepted and identity_q > best_q:
        best = None
    return Choice(best, identity_ok)


class EncodingNegotiator:
    """choose_encoding() over the configured order with a bounded memo: clients repeat the
    same few Accept-Encoding strings, so a request pays one dict lookup."""

    __slots__ = ("_max", "_memo", "order")

    def __init__(self, order: Sequence[str], max_entries: int = 256) -> None:
        self.order = tuple(c for c in order if c in available())
        self._memo: dict[str | None, Choice] = {}
        self._max = max_entries

    def choose(self, header: str | None) -> Choice:
        try:
            return self._memo[header]
        except KeyError:
            pass
        result = choose_encoding(header, self.order)
        if len(self._memo) >= self._max:
            del self._memo[next(iter(self._memo))]
        self._memo[header] = result
        return result


# ------------------------------------------------------------------ media types

VARY = istr("Vary")
NEVER = frozenset({"text/event-stream"})  # must reach the client event by event, never buffered


class MediaFilter:
    """Is a Content-Type worth compressing? Patterns are `type/sub`, `type/*` or `type/*+suffix`;
    answers are memoised per header string (bounded)."""

    __slots__ = ("_exact", "_max", "_memo", "_prefixes", "_suffixes")

    def __init__(self, patterns: Sequence[str], max_entries: int = 256) -> None:
        self._exact = frozenset(p.lower() for p in patterns if "*" not in p)
        self._prefixes = tuple(p.lower()[:-1] for p in patterns if p.endswith("/*"))
        self._suffixes = tuple(
            (p.lower().split("/")[0] + "/", p.lower().split("*", 1)[1]) for p in patterns if "/*+" in p
        )
        self._memo: dict[str, bool] = {}
        self._max = max_entries

    def _decide(self, content_type: str) -> bool:
        media = content_type.split(";", 1)[0].strip().lower()
        if not media or media in NEVER:
            return False
        if media in self._exact:
            return True
        if media.startswith(self._prefixes):
            return True
        return any(media.startswith(main) and media.endswith(suffix) for main, suffix in self._suffixes)

    def __call__(self, content_type: str | None) -> bool:
        if content_type is None:
            return False
        try:
            return self._memo[content_type]
        except KeyError:
            pass
        result = self._decide(content_type)
        if len(self._memo) >= self._max:
            del self._memo[next(iter(self._memo))]
        self._memo[content_type] = result
        return result


def no_transform(cache_control: str | None) -> bool:
    return cache_control is not None and "no-transform" in cache_control.lower()


def weaken(etag: str) -> str:
    """A strong ETag as a weak one: the compressed bytes differ, the representation does not."""
    return etag if etag.startswith("W/") else "W/" + etag


def add_vary(headers: Any, token: str) -> None:
    """Add `token` to Vary unless it (or `*`) is already there."""
    vary = headers.get("Vary")
    if vary is None:
        headers["Vary"] = token
        return
    low = vary.lower()
    if token.lower() in [v.strip() for v in low.split(",")] or low.strip() == "*":
        return
    headers["Vary"] = f"{vary}, {token}"


# ------------------------------------------------------------------ per-app state


@dataclass(frozen=True, slots=True)
class Kept:
    media: str
    etag: str
    compressible: bool
    identity: CIMultiDict[str]  # copy before use: a Response keeps the mapping it gets


class Compression:
    """What the compression middleware and the streams share, held on the app: the negotiator,
    the media filter, levels, and a bounded cache of compressed bodies of cacheable responses
    (keyed by the body bytes themselves: a repeated body object hashes once and compares by
    identity, so a hit is one dict lookup)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        order: Sequence[str] = ("zstd", "br", "gzip"),
        types: Sequence[str] = ("application/json", "text/*"),
        min_size: int = 1024,
        levels: Levels = _DEFAULT_LEVELS,
        executor_threshold: int = 128 * 1024,
        cache_entries: int = 256,
        stream_flush_bytes: int = 64 * 1024,
        stream_flush_interval: float = 0.25,
    ) -> None:
        self.enabled = enabled
        self.negotiator = EncodingNegotiator(order)
        self.compressible = MediaFilter(types)
        self.min_size = min_size
        self.levels = levels
        self.executor_threshold = executor_threshold
        self.cache_entries = cache_entries
        self.stream_flush_bytes = stream_flush_bytes
        self.stream_flush_interval = stream_flush_interval
        self._cache: dict[tuple[bytes, str], bytes] = {}
        # kept bodies (rendered pages) -> their ETag and ready-made identity headers
        self._kept: dict[bytes, Kept] = {}
        # Vary values seen -> the same with Accept-Encoding added (bounded like the other memos)
        self._vary: dict[str, str] = {}

    def vary(self, headers: Any) -> None:
        """Add Accept-Encoding to Vary, one dict lookup for a Vary value seen before."""
        current = headers.get(VARY)
        if current is None:
            headers[VARY] = "Accept-Encoding"
            return
        try:
            new = self._vary[current]
        except KeyError:
            add_vary(headers, "Accept-Encoding")
            if len(self._vary) < 64:
                self._vary[current] = headers[VARY]
            return
        if new is not current:
            headers[VARY] = new

    def kept(self, body: bytes, media: str, headers: Callable[[str, bool], CIMultiDict[str]]) -> Kept:
        """What is known of a body served again and again: its strong ETag (hashed once) and
        whether its type is compressible; `headers(media, compressible)` builds the identity
        headers (without the ETag) the first time."""
        try:
            kept = self._kept[body]
        except KeyError:
            pass
        else:
            if kept.media == media:
                return kept
        compressible = self.enabled and self.compressible(media)
        etag = etag_of(body)
        identity = headers(media, compressible)
        identity["ETag"] = etag
        kept = Kept(media, etag, compressible, identity)
        if len(self._kept) >= max(self.cache_entries, 1):
            del self._kept[next(iter(self._kept))]
        self._kept[body] = kept
        return kept

    def cached(self, body: bytes, coding: str) -> bytes | None:
        return self._cache.get((body, coding))

    def remember(self, body: bytes, coding: str, encoded: bytes) -> None:
        if self.cache_entries <= 0:
            return
        if len(self._cache) >= self.cache_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[(body, coding)] = encoded

    async def encode(self, coding: str, body: bytes, *, cache: bool = False) -> bytes:
        """`body` compressed: from the cache when `cache` and seen before; in the default
        executor when at least executor_threshold bytes, else inline."""
        if cache:
            hit = self._cache.get((body, coding))
            if hit is not None:
                return hit
        if len(body) >= self.executor_threshold:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(None, compress, coding, body, self.levels)
        else:
            encoded = compress(coding, body, self.levels)
        if cache:
            self.remember(body, coding, encoded)
        return encoded

    async def encode_chunk(self, encoder: StreamEncoder, chunk: bytes, flush: bool) -> bytes:
        """One piece of a stream, off the loop when large; `flush` makes it decodable now."""
        if len(chunk) >= self.executor_threshold:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, _encode_piece, encoder, chunk, flush)
        return _encode_piece(encoder, chunk, flush)


def _encode_piece(encoder: StreamEncoder, chunk: bytes, flush: bool) -> bytes:
    out = encoder.compress(chunk)
    return out + encoder.flush() if flush else out


def from_config(cfg: CompressionConfig) -> Compression:
    return Compression(
        enabled=cfg.enabled,
        order=cfg.order,
        types=cfg.types,
        min_size=cfg.min_size,
        levels=Levels(gzip=cfg.gzip_level, br=cfg.br_level, zstd=cfg.zstd_level),
        executor_threshold=cfg.executor_threshold,
        cache_entries=cfg.cache_entries,
        stream_flush_bytes=cfg.stream_flush_bytes,
        stream_flush_interval=cfg.stream_flush_interval,
    )


# negotiator, filters, compressed-body cache and ETags of kept bodies
COMPRESSION = web.AppKey("hotpath.compression", Compression)
