"""Content codings: the gzip, br and zstd backends, one-shot and incremental encoders (a facade
per codec), and bounded decoders for request bodies.

gzip goes through the fastest zlib-compatible backend installed: isal (ISA-L, about 10x
zlib's speed at the same ratio on our JSON), then zlib-ng, then the standard zlib. br needs
the `brotli` package and zstd `backports.zstd` (the Python 3.14 `compression.zstd` module,
which aiohttp also uses to decode zstd request bodies); a coding whose library is missing
is simply never offered.

Which coding a response gets, and the per-app cache of compressed bodies, are
server/http/compression.py's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

GZIP, BR, ZSTD, IDENTITY = "gzip", "br", "zstd", "identity"


def _zlib_backend() -> tuple[ModuleType, str]:
    try:
        from isal import isal_zlib

        return isal_zlib, "isal"
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        return zlib_ng, "zlib-ng"
    except ImportError:
        import zlib

        return zlib, "zlib"


ZLIB, ZLIB_NAME = _zlib_backend()

try:
    import brotli
except ImportError:  # pragma: no cover - brotli is in the compression and test extras
    brotli = None
try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    try:
        from backports import zstd  # type: ignore[no-redef,unused-ignore]
    except ImportError:  # pragma: no cover - backports.zstd is in the compression and test extras
        zstd = None


def available() -> tuple[str, ...]:
    """The codings this process can produce, fastest library or not."""
    return (GZIP,) + ((BR,) if brotli is not None else ()) + ((ZSTD,) if zstd is not None else ())


def _gzip_level(level: int) -> int:
    # ISA-L has levels 0-3 only; map zlib's 1-9 onto them (5 -> 2: same ratio as zlib 5 here)
    if ZLIB_NAME != "isal":
        return level
    return 0 if level == 0 else min(3, (level + 2) // 3)


@dataclass(frozen=True, slots=True)
class Levels:
    gzip: int = 5
    br: int = 4
    zstd: int = 3


def compress(coding: str, data: bytes, levels: Levels) -> bytes:
    """`data` encoded with `coding` in one go (CPU-bound: large bodies belong in an executor)."""
    if coding == GZIP:
        c = ZLIB.compressobj(_gzip_level(levels.gzip), ZLIB.DEFLATED, 31)
        return bytes(c.compress(data) + c.flush())
    if coding == BR:
        return bytes(brotli.compress(data, quality=levels.br))
    if coding == ZSTD:
        return bytes(zstd.compress(data, level=levels.zstd))
    raise ValueError(f"unknown coding {coding!r}")


class StreamEncoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> bytes: ...


class _GzipStream:
    __slots__ = ("_c",)

    def __init__(self, level: int) -> None:
        self._c = ZLIB.compressobj(_gzip_level(level), ZLIB.DEFLATED, 31)

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data))

    def flush(self) -> bytes:
        return bytes(self._c.flush(ZLIB.Z_SYNC_FLUSH))

    def finish(self) -> bytes:
        return bytes(self._c.flush())


class _BrotliStream:
    __slots__ = ("_c",)

    def __init__(self, level: int) -> None:
        self._c = brotli.Compressor(quality=level)

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.process(data))

    def flush(self) -> bytes:
        return bytes(self._c.flush())

    def finish(self) -> bytes:
        return bytes(self._c.finish())


class _ZstdStream:
    __slots__ = ("_c",)

    def __init__(self, level: int) -> None:
        self._c = zstd.ZstdCompressor(level=level)

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data))

    def flush(self) -> bytes:
        return bytes(self._c.compress(b"", zstd.ZstdCompressor.FLUSH_BLOCK))

    def finish(self) -> bytes:
        return bytes(self._c.flush())


def stream_encoder(coding: str, levels: Levels) -> StreamEncoder:
    """An incremental encoder: compress() pieces, flush() to make everything so far decodable
    by the client, finish() once at the end."""
    if coding == GZIP:
        return _GzipStream(levels.gzip)
    if coding == BR:
        return _BrotliStream(levels.br)
    if coding == ZSTD:
        return _ZstdStream(levels.zstd)
    raise ValueError(f"unknown coding {coding!r}")


# ---------------------------------------------------------------- request bodies

# aiohttp's parser inflates request bodies itself, as they arrive, and when a handler leaves
# one unread (refused at its cap) its lingering close reads, and so inflates, the rest: a
# 261 KB gzip body of 256 MB stopped the loop for 0.47 s after its 413. The app turns that
# off (handler_args auto_decompress=False) and request bodies are decoded here, never past
# the reader's cap, so a refused body's rest is drained as the raw bytes it is.
REQUEST_CODINGS: tuple[str, ...] = (
    "gzip",
    "x-gzip",
    "deflate",
    *(
        (BR,)
        if brotli is not None and "output_buffer_limit" in (brotli.Decompressor.process.__doc__ or "")
        else ()
    ),
    *((ZSTD,) if zstd is not None else ()),
)


class BodyDecoder:
    """Decodes one request body in a content coding, a piece at a time, never producing more
    than the caller's budget (plus one byte, so going over can be seen). ValueError for data
    that is not in the coding, truncated, or followed by anything but further gzip members or
    zstd frames (which concatenate)."""

    def __init__(self, coding: str) -> None:
        if coding not in REQUEST_CODINGS:
            raise ValueError(f"cannot decode {coding!r}")
        self.coding = "gzip" if coding == "x-gzip" else coding
        self._zlib: Any = None
        self._other: Any = None
        self._started = False
        self._done = False

    def _new(self, first: bytes) -> None:
        if self.coding == "gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.coding == "deflate":
            # RFC 9110 deflate is zlib-wrapped; some clients send it raw (as aiohttp allows)
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if first[0] & 0x0F == 8 else -zlib.MAX_WBITS)
        elif self.coding == BR:
            self._other = brotli.Decompressor()
        else:
            self._other = zstd.ZstdDecompressor()
        self._done = False

    def decode(self, data: bytes, budget: int) -> bytes:
        """The decoded bytes of `data`: at most `budget` + 1 of them (more means the body is
        over its cap, and the decoder is not to be used again)."""
        out: list[bytes] = []
        produced = 0
        try:
            while data and produced <= budget:
                if not self._started or self._done:
                    if self._done and self.coding not in ("gzip", ZSTD):
                        raise ValueError("data after the end of the compressed body")
                    self._new(data)
                    self._started = True
                piece, data = self._step(data, budget + 1 - produced)
                produced += len(piece)
                out.append(piece)
            while self._pending() and produced <= budget:  # output held back by the budget
                piece, _ = self._step(b"", budget + 1 - produced)
                produced += len(piece)
                out.append(piece)
        except (zlib.error, EOFError) as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # brotli.error, zstd.ZstdError: not in the coding
            if brotli is not None and isinstance(exc, brotli.error):
                raise ValueError(str(exc)) from None
            if zstd is not None and isinstance(exc, zstd.ZstdError):
                raise ValueError(str(exc)) from None
            raise
        # brotli's buffer grows in steps (up to ~32 KiB past its limit): cut to the promise,
        # what is past the budget is refused by the caller anyway
        return b"".join(out)[: budget + 1]

    def _step(self, data: bytes, room: int) -> tuple[bytes, bytes]:
        """Decode some of `data` into at most `room` bytes: (output, input left over)."""
        if self._zlib is not None:
            piece = self._zlib.decompress(data, room)
            left = self._zlib.unconsumed_tail
            if self._zlib.eof:
                self._done = True
                left = self._zlib.unused_data + left
            return piece, left
        if self.coding == BR:
            piece = self._other.process(data, output_buffer_limit=room)
            self._done = self._other.is_finished()
            return piece, b""  # brotli keeps what it has not used, and takes no more after its end
        piece = self._other.decompress(data, max_length=room)
        if self._other.eof:
            self._done = True
            return piece, self._other.unused_data
        return piece, b""

    def _pending(self) -> bool:
        if self._zlib is not None:
            return bool(self._zlib.unconsumed_tail) and not self._done
        if self._other is None or self._done:
            return False
        if self.coding == BR:
            return not self._other.can_accept_more_data()
        return not self._other.needs_input

    def finish(self) -> None:
        """ValueError unless the body ended with its last compressed stream (or was empty)."""
        if self._started and not self._done:
            raise ValueError(f"the {self.coding} body is truncated")
