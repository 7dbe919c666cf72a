"""What services and routes name: the `cached` decorator, and the groups of cached responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from functools import update_wrapper
from typing import Any, Generic, ParamSpec, TypeVar

from server.cache.core import Cache
from server.cache.entry import Hit

P = ParamSpec("P")
R = TypeVar("R")


def _normal_param(value: object) -> str:
    # isdecimal, what a route's \\d matches (isdigit also takes "²", which int() refuses)
    if isinstance(value, str) and value.isdecimal():
        try:
            return str(int(value))
        except ValueError:  # beyond int()'s 4,300 digits: no id is that long, it stays as sent
            return value
    return str(value)


def response_group(route: str, **params: object) -> str:
    """The group of every cached variant (representation, query, encoding) of one route's
    response for these path parameters: what a write invalidates."""
    # "007" and "7" are the same user: digits are normalised, or a write would miss a variant
    values = {k: _normal_param(v) for k, v in params.items()}
    return route + ":" + ",".join(f"{k}={values[k]}" for k in sorted(values))


class CachedFunction(Generic[P, R]):
    """A service function whose results are cached: call it with the app's Cache first."""

    def __init__(
        self,
        func: Callable[P, Awaitable[R]],
        namespace: str,
        ttl: float | None,
        grace: float,
        negative_ttl: float | None,
        key: Callable[..., Hashable] | None,
    ) -> None:
        self.func = func
        self.namespace = namespace
        self.ttl = ttl
        self.grace = grace
        self.negative_ttl = negative_ttl
        self._key = key
        update_wrapper(self, func)

    def _parts(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        if self._key is not None:
            return self._key(*args, **kwargs)
        return [list(args), sorted(kwargs.items())]

    async def fetch(self, cache: Cache, *args: P.args, **kwargs: P.kwargs) -> Hit[R]:
        """The result with where it came from (hit-l1, hit-l2, miss) and its ETag."""
        parts = self._parts(*args, **kwargs)
        hit: Hit[R] = await cache.get_or_load(
            self.namespace,
            parts,
            lambda: self.func(*args, **kwargs),
            ttl=self.ttl,
            grace=self.grace,
            negative_ttl=self.negative_ttl,
        )
        return hit

    async def __call__(self, cache: Cache, *args: P.args, **kwargs: P.kwargs) -> R:
        return (await self.fetch(cache, *args, **kwargs)).value

    async def invalidate(self, cache: Cache, *args: P.args, **kwargs: P.kwargs) -> None:
        """Forget the result for these arguments, in every process."""
        await cache.invalidate(self.namespace, self._parts(*args, **kwargs))


def cached(
    namespace: str,
    *,
    ttl: float | None = None,
    grace: float = 0.0,
    negative_ttl: float | None = 0.0,
    key: Callable[..., Hashable] | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
    """Cache an async service function per arguments: `await fn(cache, *args)`.

    The Cache comes from the caller (the app's, under the CACHE key), never from a global; the
    function itself is called without it. Arguments (or `key(*args)`) must be msgpack-able.
    `negative_ttl` > 0 also caches a NotFound the function raises.
    """

    def wrap(func: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        return CachedFunction(func, namespace, ttl, grace, negative_ttl, key)

    return wrap
