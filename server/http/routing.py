"""Routes whose one variable is a number, matched without a regular expression.

aiohttp matches a dynamic resource like `/users/{user_id:...}` with a compiled pattern, then
builds the match dict from `groupdict()` and unquotes each value: about 0.7 µs a request here,
on top of the walk over every resource registered under the same prefix. hotpath's ids are
all of one shape (a prefix, one number, an optional fixed suffix), so `DigitsResource` checks
that shape with string methods. A number in a path is canonical: ASCII digits (Python's `\\d`
and `str.isdecimal()` also take Arabic-Indic or fullwidth digits), no leading zero, at most
so many digits. So `/users/0001` and `/users/%D9%A1` are not other names of user 1 (each
with its own cache entry): they match nothing, and the catch-all answers 404. Everything
else (url_for, the pattern in get_info, method routing, 405s) is aiohttp's DynamicResource
unchanged; tests/http/test_routing.py holds the two matchers to the same answers.

The one private piece: `_match(path)`, which `Resource.resolve()` calls with the request's
`rel_url.path_safe` (aiohttp 3.14.5, checked). The public alternative, overriding `resolve()`,
would redo its method lookup over the private `_routes` as well. tests/http/test_routing.py pins
it: DigitsResource and DynamicResource give the same answers through the public `resolve()`
over thousands of generated paths, and `resolve()` is seen to call `_match`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

__all__ = ["DigitsResource", "PathNumber", "RoutePath", "number", "number_pattern", "register"]


def number_pattern(digits: int) -> str:
    """The regular expression of a canonical decimal number of 1..`digits` digits."""
    return f"0|[1-9][0-9]{{0,{digits - 1}}}"


def number(name: str, digits: int) -> str:
    """The path variable `{name:...}` for a canonical decimal number of 1..`digits` digits."""
    return f"{{{name}:{number_pattern(digits)}}}"


@dataclass(frozen=True)
class PathNumber:
    """A path variable declared as a number(): its name, its most digits, what it names."""

    name: str
    digits: int
    description: str

    @property
    def variable(self) -> str:
        return number(self.name, self.digits)


@dataclass(frozen=True)
class RoutePath:
    """A route's path as declared: fixed text and PathNumber variables. `pattern` is what
    aiohttp registers; `template` and `variables` are what the API document shows."""

    parts: tuple[str | PathNumber, ...]

    @property
    def pattern(self) -> str:
        return "".join(p if isinstance(p, str) else p.variable for p in self.parts)

    @property
    def template(self) -> str:
        return "".join(p if isinstance(p, str) else f"{{{p.name}}}" for p in self.parts)

    @property
    def variables(self) -> tuple[PathNumber, ...]:
        return tuple(p for p in self.parts if isinstance(p, PathNumber))


# a prefix ending in "/", a number() variable, then a suffix without variables (or none)
_SHAPE = re.compile(
    r"(?P<prefix>/[^{}]*/)\{(?P<name>[_a-zA-Z][_a-zA-Z0-9]*):0\|\[1-9\]\[0-9\]\{0,(?P<more>[0-9]+)\}\}"
    r"(?P<suffix>(?:/[^{}]*)?)"
)


class DigitsResource(web.DynamicResource):
    """A DynamicResource for `prefix{number()}suffix` that matches with string methods."""

    def __init__(self, path: str, *, name: str | None = None) -> None:
        shape = _SHAPE.fullmatch(path)
        if shape is None:
            raise ValueError(f"not a prefix{{number()}}suffix path: {path!r}")
        super().__init__(path, name=name)  # the pattern stays: url_for, get_info, repr
        self._prefix = shape["prefix"]
        self._suffix = shape["suffix"]
        self._var = shape["name"]
        self._high = int(shape["more"]) + 1
        self._start = len(self._prefix)
        self._end = -len(self._suffix) if self._suffix else None

    @staticmethod
    def fits(path: str) -> bool:
        return _SHAPE.fullmatch(path) is not None

    def add_prefix(self, prefix: str) -> None:
        super().add_prefix(prefix)
        self._prefix = prefix + self._prefix
        self._start = len(self._prefix)

    def _match(self, path: str) -> dict[str, str] | None:
        # private in aiohttp (3.14.5): what Resource.resolve() asks; see the module docstring
        if not path.startswith(self._prefix) or not path.endswith(self._suffix):  # "" ends all
            return None
        digits = path[self._start : self._end]
        # isdigit() on an ASCII string is [0-9]; "" fails it
        if not (digits.isascii() and digits.isdigit()) or len(digits) > self._high:
            return None
        if digits[0] == "0" and len(digits) > 1:
            return None
        return {self._var: digits}


def register(router: web.UrlDispatcher, route: web.RouteDef) -> None:
    """Add `route` to `router`: digit-id paths as DigitsResource, others as aiohttp would."""
    if not DigitsResource.fits(route.path):
        route.register(router)
        return
    name = route.kwargs.get("name")
    resource = DigitsResource(route.path, name=name)
    router.register_resource(resource)
    extra = {k: v for k, v in route.kwargs.items() if k != "name"}
    if route.method == "GET" and extra.pop("allow_head", True):
        resource.add_route("HEAD", route.handler, **extra)
    resource.add_route(route.method, route.handler, **extra)
