"""How a change of a key is announced to every process: one JSON message on a Redis pub/sub
channel per Redis database (the config's auth.channel, then ":<db>"), sent by the process that
made the change (server/access/verifier.py's Access.changed) or by `python run.py keys`."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

__all__ = ["announce", "change_channel", "redis_db"]


def change_channel(base: str, db: int) -> str:
    """The channel of `base` (auth.channel) for the processes on Redis database `db`."""
    return f"{base}:{db}"


def redis_db(client: aioredis.Redis) -> int:
    """The database number a client's URL chose (redis://host/N, unix://path?db=N)."""
    return int(client.connection_pool.connection_kwargs.get("db", 0) or 0)


async def announce(client: aioredis.Redis, channel: str, key_id: int) -> int:
    """Tell every process listening on `channel` that key `key_id` changed (each reloads it
    from PostgreSQL); the number of processes that heard."""
    return int(await client.publish(channel, json.dumps({"key": key_id})))
