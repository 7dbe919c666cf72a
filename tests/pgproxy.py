"""A loopback relay in front of the test run's real PostgreSQL that can bunch what it sends.

asyncpg raises InternalClientError ("cannot switch to state 12; another operation (2) is in
progress") when a server's FATAL arrives in the same read as the end of one step of a
statement (the reply to Parse/Describe) and the next step (Bind/Execute) is sent before the
end of the connection is seen. On a real server that window is a few microseconds wide.
`Relay.hold_after(text)` makes it certain: once the client sends a message containing `text`,
everything the server sends is held until the server closes the connection, then handed
over in one write, and that client side stays open until the client closes it (other
connections end when the server ends them). The bytes are the
server's own and the FATAL comes from a real pg_terminate_backend; only their timing is set.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class Relay:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        socket_dir = query.pop("host", "") if query.get("host", "").startswith("/") else ""
        port = parts.port or int(query.pop("port", "5432"))
        if socket_dir:  # embedded PostgreSQL: a Unix socket only
            self._target: tuple[str, int] | str = f"{socket_dir}/.s.PGSQL.{port}"
        else:
            self._target = (parts.hostname or "127.0.0.1", port)
        self._parts = parts._replace(query=urlencode({**query, "sslmode": "disable"}))
        self._user = parts.netloc.rpartition("@")[0]
        self._server: asyncio.Server | None = None
        self._trigger: bytes | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.held = bytearray()  # what the server sent to the triggered connection, not yet delivered
        self.delivered = asyncio.Event()  # the held bytes went to the client, in one write
        self.url = ""

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = f"{self._user}@127.0.0.1:{port}" if self._user else f"127.0.0.1:{port}"
        self.url = urlunsplit(self._parts._replace(netloc=netloc))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # not task.cancel(): asyncio logs a cancelled handler task
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def hold_after(self, text: bytes) -> None:
        """Arm once: the next connection whose client sends `text` has its replies held."""
        self.held.clear()
        self.delivered.clear()
        self._trigger = text

    def described(self) -> bool:
        """Whether the held replies include the server's answer to Describe (NoData or
        RowDescription): the first step of the statement is over, the second not yet sent."""
        held, i, types = self.held, 0, set()
        while i + 5 <= len(held):
            types.add(bytes(held[i : i + 1]))
            i += 1 + int.from_bytes(held[i + 1 : i + 5], "big")
        return bool(types & {b"n", b"T"})

    async def _relay(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = {cwriter}
        self._writers |= writers
        try:
            if isinstance(self._target, str):
                sreader, swriter = await asyncio.open_unix_connection(self._target)
            else:
                sreader, swriter = await asyncio.open_connection(*self._target)
            writers.add(swriter)
            self._writers.add(swriter)
            holding = asyncio.Event()

            async def up() -> None:
                while data := await creader.read(65536):
                    if self._trigger is not None and self._trigger in data:
                        self._trigger = None
                        holding.set()
                    swriter.write(data)
                swriter.close()

            async def down() -> None:
                while data := await sreader.read(65536):
                    if holding.is_set():
                        self.held += data
                    else:
                        cwriter.write(data)
                if holding.is_set():  # the server has gone: everything it said, at once
                    cwriter.write(bytes(self.held))
                    self.held.clear()
                    self.delivered.set()
                else:
                    cwriter.close()

            downstream = asyncio.create_task(down())
            try:
                await up()  # until the client closes its side
            finally:
                downstream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await downstream
        except (ConnectionError, OSError):
            pass
        finally:
            for writer in writers:
                writer.close()
            self._writers -= writers
            self._tasks.discard(task)
