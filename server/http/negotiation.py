"""Accept header parsing and content negotiation (RFC 9110 section 12.5.1)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

MAX_HEADER = 4096  # longer Accept headers are cut here: bounded work per request
MAX_RANGES = 64
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


@dataclass(frozen=True, slots=True)
class MediaRange:
    type: str
    subtype: str
    q: float


def q_value(params: Sequence[str]) -> float | None:
    """The q of one header element from its parameters ("q=0.5"), 1.0 when it has none; None
    when q is not a number in 0..1 (the element is then dropped). Parameters after q are
    accept-extensions and ignored. Shared by Accept and Accept-Encoding."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() != "q":
            continue
        try:
            q = float(value.strip())
        except ValueError:
            return None
        return q if math.isfinite(q) and 0.0 <= q <= 1.0 else None
    return 1.0


def parse_accept(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header; malformed entries are skipped, never fatal.

    A bare `*` is read as `*/*`; parameters other than q are tolerated (ignored for matching);
    a q outside 0..1 or not a number drops that entry.
    """
    ranges: list[MediaRange] = []
    for part in header[:MAX_HEADER].split(",", MAX_RANGES)[:MAX_RANGES]:
        pieces = part.split(";")
        media = pieces[0].strip().lower()
        if not media:
            continue
        if media == "*":
            media = "*/*"
        main, slash, sub = media.partition("/")
        if not slash or not _TOKEN.match(main) or not _TOKEN.match(sub) or (main == "*" and sub != "*"):
            continue
        q = q_value(pieces[1:])
        if q is not None:
            ranges.append(MediaRange(main, sub, q))
    return ranges


def quality(media_type: str, ranges: Sequence[MediaRange]) -> float:
    """The q the client gives `media_type`: that of the most specific range matching it
    (type/subtype beats type/* beats */*); the highest q among equally specific ones."""
    main, _, sub = media_type.partition("/")
    best_rank, best_q = -1, 0.0
    for r in ranges:
        if r.type == main and r.subtype == sub:
            rank = 2
        elif r.type == main and r.subtype == "*":
            rank = 1
        elif r.type == "*":
            rank = 0
        else:
            continue
        if rank > best_rank:
            best_rank, best_q = rank, r.q
        elif rank == best_rank and r.q > best_q:
            best_q = r.q
    return best_q


def choose(header: str | None, offers: Sequence[str]) -> str | None:
    """The offer the client prefers, ties going to the earlier offer; None when the client
    accepts none of them. No header (or an empty or wholly malformed one) means any type."""
    if not header:
        return offers[0]
    ranges = parse_accept(header)
    if not ranges:
        return offers[0]
    best, best_q = None, 0.0
    for offer in offers:
        q = quality(offer, ranges)
        if q > best_q:
            best, best_q = offer, q
    return best


class Negotiator:
    """choose() over fixed offers with a bounded memo: clients repeat the same few Accept
    strings, so the JSON path pays one dict lookup instead of a parse."""

    __slots__ = ("_max", "_memo", "offers")

    def __init__(self, offers: Sequence[str], max_entries: int = 1024) -> None:
        self.offers = tuple(offers)
        self._memo: dict[str | None, str | None] = {}
        self._max = max_entries

    def choose(self, header: str | None) -> str | None:
        try:
            return self._memo[header]
        except KeyError:
            pass
        result = choose(header, self.offers)
        if len(self._memo) >= self._max:
            del self._memo[next(iter(self._memo))]  # oldest first: cheap and bounded
        self._memo[header] = result
        return result


NEGOTIATOR = web.AppKey("hotpath.negotiator", Negotiator)
