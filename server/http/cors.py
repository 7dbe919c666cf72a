"""CORS ([cors] in config.toml): the headers of cross-origin answers, and the preflights' answers.

One `Cors` policy is built per app from CorsConfig at start-up, its header values strings made
once, its origins a frozenset; with `cors.allow_origins` empty there is none (`from_config` gives
None) and no layer does any CORS work. Where the headers are added:

- Answers that are not prepared yet: the outermost layer (middlewares/request_context.py) calls
  `Cors.apply` on every one, after every layer inside it has answered. So the cache's quick
  answers and the kept products answers get the headers too, and neither the cache nor the kept
  answers ever hold a per-origin header: they are added to each answer's own copy.
- Answers a handler prepares itself (event streams, exports): server/http/streams.py's
  stream_headers() calls `Cors.apply` before prepare().
- Preflights (OPTIONS with Origin and Access-Control-Request-Method): `preflight()`, which the
  outermost layer of the catch-all route tries before the layers inside it. No route declares
  OPTIONS, so every OPTIONS request ends at the catch-all, and a preflight, which carries no
  credentials, never reaches a rate limit or a key check that could refuse it.

A browser checks the answer itself: a preflight naming a request header the policy does not
allow is answered without Access-Control-Allow-Headers, and the browser refuses the request.
"""

from __future__ import annotations

from functools import partial
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from server.config import CorsConfig
from server.http.compression import VARY, add_vary
from server.http.layers import Quick
from server.http.problems import problem_response

__all__ = ["CORS", "Cors", "from_config", "normalise_origin", "preflight", "preflight_first"]

# Header names as istr: a CIMultiDict takes them without folding their case per call
ORIGIN = hdrs.ORIGIN
_ALLOW_ORIGIN = hdrs.ACCESS_CONTROL_ALLOW_ORIGIN
_EXPOSE = hdrs.ACCESS_CONTROL_EXPOSE_HEADERS
_CREDENTIALS = hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS
_REQUEST_METHOD = hdrs.ACCESS_CONTROL_REQUEST_METHOD
_REQUEST_HEADERS = hdrs.ACCESS_CONTROL_REQUEST_HEADERS
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_VARY_MEMO_MAX = 64  # distinct Vary values a response may carry: a handful per app


def normalise_origin(origin: str) -> str:
    """`origin` as a browser serialises it in its Origin header: scheme and host in lower case,
    no default port ("https://App.example.com:443" -> "https://app.example.com")."""
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        return origin.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    scheme = parts.scheme.lower()
    suffix = f":{port}" if port is not None and port != _DEFAULT_PORTS.get(scheme) else ""
    return f"{scheme}://{host}{suffix}"


class Cors:
    """The policy of one app: which origins may read its answers, and the headers they get."""

    __slots__ = (
        "_credentials",
        "_expose",
        "_preflight",
        "_star",
        "_vary",
        "_wanted_headers",
        "allow_headers",
        "any_origin",
        "origins",
    )

    def __init__(self, config: CorsConfig) -> None:
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(normalise_origin(o) for o in config.allow_origins if o != "*")
        # "*" as the allowed origin only without credentials (browsers refuse that pair, and
        # the config refuses it too); with credentials the request's origin is echoed
        self._star = "*" if self.any_origin and not config.allow_credentials else None
        self.allow_headers = ", ".join(config.allow_headers)
        self._wanted_headers = frozenset(h.strip().lower() for h in config.allow_headers)
        self._expose = ", ".join(config.expose_headers) if config.expose_headers else None
        self._credentials = config.allow_credentials
        credentials = ((_CREDENTIALS, "true"),) if config.allow_credentials else ()
        self._preflight: tuple[tuple[istr, str], ...] = (
            (hdrs.ACCESS_CONTROL_ALLOW_METHODS, ", ".join(config.allow_methods)),
            (hdrs.ACCESS_CONTROL_MAX_AGE, str(config.max_age)),
            *credentials,
            (VARY, _PREFLIGHT_VARY),
        )
        # Vary values seen -> the same with Origin added (one dict lookup per answer)
        self._vary: dict[str, str] = {}

    def allowed(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin value for `origin`, or None when it is not allowed."""
        if origin in self.origins:
            return origin
        if self.any_origin:
            return self._star or origin
        return None

    def apply(self, origin: str | None, headers: CIMultiDict[str]) -> None:
        """Give an actual (non-preflight) answer its CORS headers, for a request whose Origin
        header is `origin`: `Vary: Origin` always (added to the Vary there is), the others when
        the origin is allowed."""
        vary = headers.get(VARY)
        if vary is None:
            headers[VARY] = "Origin"
        else:
            merged = self._vary.get(vary)
            if merged is None:
                merged = self._merged_vary(vary)
            if merged is not vary:
                headers[VARY] = merged
        if origin is None:
            return
        # allowed(), inlined: this runs for every answer to a cross-origin request
        if origin in self.origins:
            headers[_ALLOW_ORIGIN] = origin
        elif self.any_origin:
            headers[_ALLOW_ORIGIN] = self._star or origin
        else:
            return
        if self._expose is not None:
            headers[_EXPOSE] = self._expose
        if self._credentials:
            headers[_CREDENTIALS] = "true"

    def _merged_vary(self, vary: str) -> str:
        out = CIMultiDict({VARY: vary})
        add_vary(out, "Origin")
        merged = out[VARY]
        if merged == vary:
            merged = vary  # the same object: the caller leaves the header alone
        if len(self._vary) < _VARY_MEMO_MAX:
            self._vary[vary] = merged
        return merged

    def headers_allowed(self, requested: str | None) -> bool:
        """Whether every header an Access-Control-Request-Headers value names is allowed."""
        if not requested or "*" in self._wanted_headers:
            return True
        wanted = self._wanted_headers
        return all(not name or name in wanted for name in (n.strip().lower() for n in requested.split(",")))

    def preflight_answer(self, origin: str, request_headers: CIMultiDictProxy[str]) -> web.Response | None:
        """The 204 answering a preflight from `origin`, or None when the origin is not allowed."""
        allow = self.allowed(origin)
        if allow is None:
            return None
        out = CIMultiDict[str]({_ALLOW_ORIGIN: allow})
        out.extend(self._preflight)
        if self.headers_allowed(request_headers.get(_REQUEST_HEADERS)):
            out[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = self.allow_headers
        return web.Response(status=204, headers=out)


def from_config(config: CorsConfig) -> Cors | None:
    """The app's policy, or None when no origin is allowed (then no CORS work at all)."""
    return Cors(config) if config.allow_origins else None


def _refused(request: web.Request, origin: str) -> web.Response:
    shown = origin if len(origin) <= 200 else origin[:200] + "..."
    return problem_response(
        403,
        "Forbidden",
        f"origin {shown!r} may not call this API cross-origin (it is not in cors.allow_origins)",
        type_="/problems/origin-not-allowed",
        accept=request.headers.get(hdrs.ACCEPT),
    )


def preflight(cors: Cors | None, request: web.Request) -> web.Response | None:
    """The answer to a CORS preflight (OPTIONS with Origin and Access-Control-Request-Method):
    204 with the policy's headers for an allowed origin, 403 problem+json (no CORS headers)
    for any other origin or when CORS is off. None for any other request."""
    if request.method != hdrs.METH_OPTIONS:
        return None
    headers = request.headers
    origin = headers.get(ORIGIN)
    if origin is None or _REQUEST_METHOD not in headers:
        return None
    answer = cors.preflight_answer(origin, headers) if cors is not None else None
    return answer if answer is not None else _refused(request, origin)


def preflight_first(cors: Cors | None, quick: Quick | None) -> Quick:
    """A quick answer (server/http/layers.py) that answers preflights, else tries `quick`."""
    if quick is None:
        return partial(preflight, cors)

    def answer(request: web.Request) -> web.Response | None:
        response = preflight(cors, request)
        return response if response is not None else quick(request)

    return answer


CORS: web.AppKey[Cors | None] = web.AppKey("hotpath.cors")
