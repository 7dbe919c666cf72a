"""Accept parsing and choice (RFC 9110 section 12.5.1), against a table of cases."""

from __future__ import annotations

import pytest

from server.http.negotiation import MediaRange, Negotiator, choose, parse_accept, quality
from server.http.render import OFFERS

JSON, MSGPACK, YAML, XML = (
    "application/json",
    "application/vnd.msgpack",
    "application/yaml",
    "application/xml",
)
CSV, TEXT, HTML = "text/csv", "text/plain", "text/html"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("*", JSON),  # a bare * is tolerated as */*
        ("application/*", JSON),
        ("text/*", TEXT),
        ("application/xml", XML),
        ("application/x-msgpack", "application/x-msgpack"),  # aliases answer with the asked name
        ("text/xml", "text/xml"),
        ("application/x-yaml", "application/x-yaml"),
        ("APPLICATION/YAML", YAML),  # case-insensitive
        # a browser
        ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8", HTML),
        # q decides
        ("application/yaml;q=0.5, application/xml;q=0.9", XML),
        ("application/json;q=0.1, application/vnd.msgpack", MSGPACK),
        # ties go to the server's order (JSON first)
        ("application/xml, application/json", JSON),
        ("text/csv, text/plain", TEXT),
        # specificity beats order: the exact range's q=0 wins over */*
        ("*/*, application/json;q=0", MSGPACK),
        ("application/json;q=0, */*;q=0.5", MSGPACK),
        ("text/*;q=0.9, text/plain;q=0", CSV),
        # ... and beats a higher q of a wildcard
        ("*/*;q=1, application/json;q=0.2, application/vnd.msgpack;q=0.3", YAML),
        # parameters tolerated
        ("application/json; charset=utf-8", JSON),
        ('application/xml; charset="utf-8"; q=0.8, application/yaml;q=0.7', XML),
        ("application/json;q=0.5;ext=1", JSON),
        # malformed entries skipped, not fatal
        ("garbage, application/xml", XML),
        ("application/xml;q=abc, application/yaml", YAML),
        ("application/xml;q=2, application/yaml;q=0.1", YAML),
        ("application/xml;q=-1, text/csv;q=0.1", CSV),
        ("application/xml;q=nan, text/csv;q=0.1", CSV),
        ("*/json, text/csv", CSV),
        ("/, ;;, ,,, text/html", HTML),
        ("\x00\x01, application/yaml", YAML),
        ("garbage;;;", JSON),  # nothing valid at all: as if no Accept
        # nothing acceptable
        ("image/png", None),
        ("application/json;q=0", None),
        ("*/*;q=0", None),
        ("text/*;q=0, application/*;q=0", None),
    ],
)
def test_choose(accept: str | None, expected: str | None) -> None:
    assert choose(accept, OFFERS) == expected


def test_parse_accept_reads_q_and_skips_junk() -> None:
    assert parse_accept("text/html;level=1;q=0.4, */*;q=0.1, bad, a/b;q=x") == [
        MediaRange("text", "html", 0.4),
        MediaRange("*", "*", 0.1),
    ]


def test_quality_uses_most_specific_range() -> None:
    ranges = parse_accept("text/*;q=0.3, text/html;q=0.7, */*;q=0.5")
    assert quality("text/html", ranges) == 0.7
    assert quality("text/csv", ranges) == 0.3
    assert quality("image/png", ranges) == 0.5


def test_very_long_header_is_bounded_and_still_answers() -> None:
    header = ", ".join(f"x-{i}/y-{i};q=0.5" for i in range(20_000)) + ", application/xml"
    assert len(header) > 100_000
    # only the first MAX_HEADER characters are read: the xml range at the end is never seen
    assert choose(header, OFFERS) is None
    assert choose("application/xml, " + header, OFFERS) == XML


def test_negotiator_memo_is_bounded_and_consistent() -> None:
    neg = Negotiator(OFFERS, max_entries=8)
    for i in range(50):
        assert neg.choose(f"application/xml;q=0.{i % 9 + 1}, x/{i}") == XML
    assert len(neg._memo) <= 8
    assert neg.choose(None) == JSON
    assert neg.choose("image/png") is None
