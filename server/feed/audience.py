"""Who receives what on the feed: the channels a caller may read, and for the channels whose
events belong to an owner (a task's events to the key that made it), whose events.

Decided once when a stream opens (or a stream token is issued), from the caller's principal and
feed.private_channels; the fan-out then only looks up the subscribers of an event's channel, and
of its owner, never tests each subscriber per event (server/feed/subscribers.py).

- A public channel: anyone (a stream token only when it names the channel).
- A private channel: a principal holding one of its reader scopes (`admin` reads every one).
- `tasks`, when private: each event goes to the subscribers of its owner (the key family that
  made the task) and to `admin` subscribers; an event with no owner to `admin` ones alone.
- A route opened by auth.open_routes (the migration path for clients without keys) checks no
  channel's scopes: callers without a key read every channel, as before keys existed. Task
  events still go by owner there, as GET /task-status answers (server/jobs/queue.py's Viewer):
  a caller without a key gets those of the tasks made without one. A stream token still limits
  its holder to its channels.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from server.access.scopes import ADMIN, JOBS, READ, USERS_READ
from server.errors import DomainError
from server.http.auth import Principal

__all__ = ["NOBODY", "OWNED", "Audience", "ChannelForbidden", "Channels", "owned_by"]

# Channels whose events carry an owner (the Redis stream field `o`): a task's key family.
OWNED: frozenset[str] = frozenset({"tasks"})
# The owner, as a routed subscriber names it, of the events that have none (tasks made without a key)
NOBODY = b""
# The scopes that may read a private channel (a private channel not named here: `read`).
READERS: dict[str, tuple[str, ...]] = {"users": (USERS_READ, ADMIN), "tasks": (JOBS, ADMIN)}
_READERS_DEFAULT = (READ, ADMIN)


@dataclass(frozen=True, slots=True)
class Audience:
    """What one subscriber receives: `channels`; of those in `routed`, only the events of
    `owner` (the owner's id as the stream field holds it, ASCII digits; NOBODY: the events
    that have no owner)."""

    channels: frozenset[str]
    routed: frozenset[str] = frozenset()
    owner: bytes = NOBODY

    def admits(self, channel: str, owner: bytes | None) -> bool:
        """Whether an event of `channel` with `owner` (None: none) is for this subscriber."""
        if channel not in self.channels:
            return False
        return channel not in self.routed or (owner or NOBODY) == self.owner


def owned_by(principal: Principal | None, channels: frozenset[str], routed: frozenset[str]) -> Audience:
    """`channels`, those in `routed` limited to the caller's own events: a key's (its family's),
    every owner's for `admin`, the ownerless ones for a caller without a key (or a shared
    token), as server/jobs/queue.py's Viewer decides whose tasks a caller sees."""
    mine = channels & routed
    if not mine or (principal is not None and ADMIN in principal.scopes):
        return Audience(channels)
    owner = principal.owner if principal is not None else None
    return Audience(channels, mine, NOBODY if owner is None else str(owner).encode())


class ChannelForbidden(DomainError):
    """A feed channel the caller may not read (403, naming the channel)."""

    status = 403
    title = "Forbidden"
    type_slug = "forbidden"

    def __init__(self, channel: str, detail: str, scopes: tuple[str, ...] = ()) -> None:
        extra: dict[str, object] = {"channel": channel}
        if scopes:
            extra["scope"] = " ".join(scopes)
        super().__init__(detail, extra=extra)


class Channels:
    """The read rights of the feed's channels under one configuration."""

    def __init__(self, private: Collection[str]) -> None:
        self.private = frozenset(private)
        self.routed = OWNED & self.private  # owner-routed only while private: public is everyone's

    def refusal(self, principal: Principal | None, channel: str) -> ChannelForbidden | None:
        """Why `principal` (None: anonymous) may not read `channel`, or None when it may."""
        token = self._token_refusal(principal, channel)
        if token is not None:
            return token
        if channel not in self.private:
            return None
        readers = READERS.get(channel, _READERS_DEFAULT)
        if principal is None:
            return ChannelForbidden(
                channel,
                f"the channel {channel!r} is private: open the stream with a key or a stream token "
                f"(POST /feed/tokens) allowed to read it",
                readers,
            )
        if not principal.allows(readers):
            return ChannelForbidden(
                channel,
                f"this key may not read the channel {channel!r}: it needs {' or '.join(readers)}",
                readers,
            )
        if channel in self.routed and principal.owner is None and ADMIN not in principal.scopes:
            return ChannelForbidden(
                channel, f"the channel {channel!r} carries the events of a key's own tasks"
            )
        return None

    def audience(
        self,
        principal: Principal | None,
        asked: Collection[str] | None,
        default: Collection[str],
        opened: bool = False,
    ) -> Audience:
        """What a stream receives. `asked`: the channels the client named (each must be
        readable, else ChannelForbidden); None: `default`, narrowed to what the caller may read.
        `opened`: the route is open (auth.open_routes): no check but a stream token's channels."""
        wanted = tuple(default if asked is None else asked)
        readable: list[str] = []
        first: ChannelForbidden | None = None
        for channel in wanted:
            refusal = self._token_refusal(principal, channel) if opened else self.refusal(principal, channel)
            if refusal is None:
                readable.append(channel)
            elif asked is not None:
                raise refusal
            elif first is None:
                first = refusal
        if not readable and first is not None:
            raise first  # nothing of the default set is readable: say why rather than stay silent
        return owned_by(principal, frozenset(readable), self.routed)

    @staticmethod
    def _token_refusal(principal: Principal | None, channel: str) -> ChannelForbidden | None:
        if principal is not None and principal.channels is not None and channel not in principal.channels:
            return ChannelForbidden(channel, f"this stream token does not cover the channel {channel!r}")
        return None
