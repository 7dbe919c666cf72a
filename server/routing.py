"""Routes whose one variable is a run of digits, matched without a regular expression.

aiohttp matches a dynamic resource like `/users/{user_id:\\d+}` with a compiled pattern, then
builds the match dict from `groupdict()` and unquotes each value: about 0.7 µs a request here,
on top of the walk over every resource registered under the same prefix. hotpath's ids are
all of one shape (a prefix, one run of digits, an optional fixed suffix), so `DigitsResource`
checks that shape with string methods: the prefix, the suffix, and `str.isdecimal()` on what
lies between, which accepts exactly what the pattern's `\\d` does (Unicode category Nd) with
the same length bounds. Everything else (url_for, the pattern in get_info, method routing,
405s) is aiohttp's DynamicResource unchanged; tests/test_routing.py holds the two matchers to
the same answers.
"""

from __future__ import annotations

import re
import sys

from aiohttp import web
from aiohttp.web_urldispatcher import DynamicResource

# a prefix ending in "/", {name:\d+} or {name:\d{1,N}}, then a suffix without variables (or none)
_SHAPE = re.compile(
    r"(?P<prefix>/[^{}]*/)\{(?P<name>[_a-zA-Z][_a-zA-Z0-9]*):\\d(?:\+|\{1,(?P<high>[1-9][0-9]*)\})\}"
    r"(?P<suffix>(?:/[^{}]*)?)"
)


class DigitsResource(DynamicResource):
    """A DynamicResource for `prefix{name:\\d...}suffix` that matches with string methods."""

    def __init__(self, path: str, *, name: str | None = None) -> None:
        shape = _SHAPE.fullmatch(path)
        if shape is None:
            raise ValueError(f"not a prefix{{name:\\d+}}suffix path: {path!r}")
        super().__init__(path, name=name)  # the pattern stays: url_for, get_info, repr
        self._prefix = shape["prefix"]
        self._suffix = shape["suffix"]
        self._var = shape["name"]
        self._high = int(shape["high"]) if shape["high"] else sys.maxsize
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
        if not path.startswith(self._prefix) or not path.endswith(self._suffix):  # "" ends all
            return None
        digits = path[self._start : self._end]
        if not digits.isdecimal() or len(digits) > self._high:  # isdecimal: False for "" too
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
