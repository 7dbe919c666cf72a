"""server/http/routing.py: DigitsResource matches exactly what aiohttp's regex DynamicResource does."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web import DynamicResource
from yarl import URL

from server.http.routing import DigitsResource, number, register
from server.routes import ROUTES

SHAPES = [
    "/users/" + number("user_id", 19),
    "/users/" + number("user_id", 19) + "/profile",
    "/stream-json/" + number("record_count", 12),
    "/tasks/" + number("task_id", 19) + "/events",
    "/a/b/" + number("n", 1),
]
PATHS = [
    "/users/1",
    "/users/0042",  # a leading zero: another spelling of 42, matched by neither
    "/users/0",
    "/users/00",
    "/users/10",
    "/users/",
    "/users",
    "/users/1/",
    "/users/1/profile",
    "/users//profile",
    "/users/profile",
    "/users/x/profile",
    "/users/12/profilex",
    "/users/12/profile/",
    "/users/1 ",
    "/users/-1",
    "/users/+1",
    "/users/1.0",
    "/users/１２",  # fullwidth digits: Unicode Nd, which \d would match; [0-9] does not
    "/users/١٢٣",  # Arabic-Indic digits
    "/users/١",
    "/users/²",  # superscript two: a digit but not decimal (Nd), matched by neither
    "/users/1\n",
    "/users/%31",
    "/stream-json/" + "9" * 12,
    "/stream-json/" + "9" * 13,
    "/stream-json/",
    "/tasks/1/events",
    "/tasks/" + "1" * 19 + "/events",
    "/tasks/" + "1" * 20 + "/events",
    "/users/" + "9" * 19,
    "/users/" + "9" * 20,
    "/users/1" + "0" * 5000,
    "/tasks/1/event",
    "/tasks/events",
    "/a/b/7",
    "/a/b/0",
    "/a/b/77",
    "/a/b/",
    "/",
    "",
]


@pytest.mark.parametrize("shape", SHAPES)
def test_digits_resource_matches_like_the_regex(shape: str) -> None:
    fast, regex = DigitsResource(shape), DynamicResource(shape)
    for path in PATHS:
        assert fast._match(path) == regex._match(path), (shape, path)


def test_every_digit_route_is_a_digits_resource() -> None:
    """The route table's id routes all take the fast matcher; the rest stay aiohttp's."""
    router = web.UrlDispatcher()
    for route in ROUTES:
        register(router, route)
    resources = {r.canonical: r for r in router.resources()}
    assert type(resources["/users/{user_id}"]) is DigitsResource
    assert type(resources["/task-status/{task_id}"]) is DigitsResource
    assert type(resources["/users"]) is not DigitsResource
    digit_paths = [r.path for r in ROUTES if "[0-9]" in r.path]
    assert digit_paths and all(DigitsResource.fits(p) for p in digit_paths)


def test_other_shapes_are_refused() -> None:
    refused = ["/users", r"/{tail:[\s\S]*}", r"/a/{x:\d{3}}", r"/a/{x:\d+}", "/" + number("x", 3)]
    for path in [*refused, "/a/" + number("x", 2) + number("y", 2)]:
        assert not DigitsResource.fits(path)
        with pytest.raises(ValueError):
            DigitsResource(path)


async def test_routes_resolve_and_build_urls(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """Method routing, HEAD, 405 and url_for behave as with aiohttp's own resources."""

    async def show(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["item_id"], "method": request.method})

    app = web.Application()
    item = "/items/" + number("item_id", 19)
    register(app.router, web.get(item, show, name="item"))
    register(app.router, web.delete(item, show, name="item_delete"))
    register(
        app.router, web.get("/items/" + number("item_id", 3) + "/parts", show, name="parts", allow_head=False)
    )
    client = await aiohttp_client(app)
    assert str(app.router["item"].url_for(item_id="7")) == "/items/7"
    resp = await client.get("/items/12")
    assert resp.status == 200 and await resp.json() == {"id": "12", "method": "GET"}
    assert (await client.head("/items/12")).status == 200
    assert (await (await client.delete("/items/12")).json())["method"] == "DELETE"
    assert (await client.get("/items/1234/parts")).status == 404
    assert (await client.get("/items/x")).status == 404
    resp = await client.head("/items/12/parts")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    resp = await client.post("/items/12")
    assert resp.status == 405 and set(resp.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}


# ---------------------------------------------------------------- the oracle: aiohttp's own matcher
# DigitsResource overrides DynamicResource._match, private in aiohttp (checked on 3.14.5). These
# tests pin it: over generated paths it answers exactly as the regex resource does, through the
# public resolve() as well, and resolve() still asks _match (else the speed-up silently goes).

HEADS = ["", "/", "/users", "/users/", "/user/", "/tasks/", "/stream-json/", "/a/b/", "/a/", "/api/users/"]
TAILS = ["", "/", "/profile", "/profilex", "/events", "/event", "//", "/profile/", "x"]
ATOMS = ["0", "1", "7", "9", "00", "01", "10", "a", "-", "+", ".", " ", "/", "%", "%31", "%2F"]
ATOMS += ["\uff11", "\u0661", "\u00b2", "\n", "\u00e9"]  # fullwidth 1, Arabic-Indic 1, superscript 2


def _middles() -> list[str]:
    pairs = ["".join(p) for p in itertools.product(ATOMS, repeat=2)]
    numbers = ["9" * n for n in (2, 3, 8, 9, 11, 12, 13, 18, 19, 20, 21)]
    numbers += ["1" + "0" * n for n in (9, 11, 12, 18, 19)] + ["0" + "9" * n for n in (1, 11, 18, 19)]
    return ["", *ATOMS, *pairs, *numbers]


def _generated_paths() -> list[str]:
    return [h + m + t for h in HEADS for m in _middles() for t in TAILS]


@pytest.mark.parametrize("shape", SHAPES)
def test_digits_match_equals_the_regex_over_generated_paths(shape: str) -> None:
    fast, regex = DigitsResource(shape), DynamicResource(shape)
    paths = _generated_paths()
    assert len(paths) > 20_000
    differ = [p for p in paths if fast._match(p) != regex._match(p)]
    assert differ == [], (shape, differ[:10])
    # under a sub-application's prefix too (add_prefix)
    fast.add_prefix("/api")
    regex.add_prefix("/api")
    differ = [p for p in paths if fast._match("/api" + p) != regex._match("/api" + p)]
    assert differ == [], (shape, differ[:10])


async def _handler(request: web.Request) -> web.StreamResponse:
    return web.Response()


def _resolved(resolve: tuple[Any, set[str]]) -> tuple[Any, ...]:
    info, allowed = resolve
    if info is None:
        return None, frozenset(allowed)
    return dict(info), info.route.method, frozenset(allowed)


async def test_digits_resolve_equals_the_regex_through_the_public_api() -> None:
    """resolve() is what the router calls: the same match dict, route and allowed methods for
    requests to the generated paths (percent-encoded and non-ASCII ones included). A request
    here is what resolve() reads of one: its method and its URL, parsed by yarl as aiohttp does."""
    near = ("/users/", "/tasks/", "/stream-json/", "/a/b/")  # where the shapes' numbers begin
    paths = [p for p in _generated_paths() if p.startswith(near)]
    paths += random.Random(22).sample([p for p in _generated_paths() if p.startswith("/")], 2000)
    urls = [URL(path) for path in [*paths, *(p for p in PATHS if p.startswith("/"))]]
    requests = [SimpleNamespace(method=m, rel_url=url) for url in urls for m in ("GET", "POST")]
    for shape in SHAPES:
        fast, regex = DigitsResource(shape), DynamicResource(shape)
        for resource in (fast, regex):
            resource.add_route("GET", _handler)
            resource.add_route("DELETE", _handler)
        for request in requests:
            got, want = await fast.resolve(request), await regex.resolve(request)  # type: ignore[arg-type]
            assert _resolved(got) == _resolved(want), (shape, request.method, str(request.rel_url))


async def test_resolve_still_asks_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """If aiohttp stopped calling _match, DigitsResource would still answer (with the regex it
    inherits), only slower: this is the test that notices."""
    asked: list[str] = []
    own = DigitsResource._match

    def spy(self: DigitsResource, path: str) -> dict[str, str] | None:
        asked.append(path)
        return own(self, path)

    monkeypatch.setattr(DigitsResource, "_match", spy)
    app = web.Application()
    register(app.router, web.get("/items/" + number("item_id", 19), _handler, name="item"))
    app.router.freeze()
    info = await app.router.resolve(make_mocked_request("GET", "/items/12", app=app))
    assert info.route.name == "item" and dict(info) == {"item_id": "12"}
    assert asked == ["/items/12"]


def test_digits_resource_state_uses_names_of_its_own() -> None:
    """DigitsResource's attributes are none of DynamicResource's (aiohttp 3.14.5): an upgrade
    that took one of the names fails here instead of matching wrongly."""
    shape = SHAPES[1]
    own = {"_prefix", "_suffix", "_var", "_high", "_start", "_end"}
    theirs = set(vars(DynamicResource(shape))) | set(dir(DynamicResource))
    assert set(vars(DigitsResource(shape))) - set(vars(DynamicResource(shape))) == own  # all it adds
    assert not own & theirs
