"""Looking into a Redis broker's queues: their lists, their depth, the task ids they hold."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from redis import Redis

from conveyor.broker.config import PRIORITY_LEVELS, PRIORITY_SEPARATOR
from conveyor.broker.internals import UNACKED_KEY, unacked_messages


def queue_lists(queue: str) -> list[str]:
    """Return the Redis lists kombu keeps for a queue, one per priority level.

    Named as Celery's routing guide documents ("Redis Message Priorities"): the queue's own
    name for level 0, then the separator and the level.
    """
    return [f"{queue}{PRIORITY_SEPARATOR}{n}" if n else queue for n in PRIORITY_LEVELS]


def queue_depth(redis: Redis, queue: str) -> int:
    """Count the messages waiting in a Redis-broker queue, over all its priority lists."""
    return queue_depths(redis, [queue])[queue]


def queue_depths(redis: Redis, queues: Sequence[str]) -> dict[str, int]:
    """Count the messages waiting in each Redis-broker queue, in one round trip."""
    per = len(PRIORITY_LEVELS)
    with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in queue_lists(queue):
                pipe.llen(name)
        counts = pipe.execute()
    return {queue: sum(counts[n * per : (n + 1) * per]) for n, queue in enumerate(queues)}


def broker_task_ids(
    redis: Redis, queues: Iterable[str], limit: int, *, delivered_since: float | None = None
) -> set[str] | None:
    """Return the ids of every task waiting in or delivered from these Redis-broker queues.

    Reads the priority lists and kombu's `unacked` hash. With `delivered_since` (a Unix
    time), unacked messages delivered before it are left out: a queued job whose message a
    consumer took that long ago and never claimed was taken by a consumer that died, and
    Redis would only give it back after the visibility timeout (hours). `None` when there
    are more than `limit` messages: too many to read on a housekeeping pass, so nothing can
    be concluded.
    """
    names = [name for queue in queues for name in queue_lists(queue)]
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        pipe.hlen(UNACKED_KEY)
        sizes = pipe.execute()
    if sum(sizes) > limit:
        return None
    raw: list[bytes | str] = []
    for name, size in zip(names, sizes, strict=False):
        if size:
            raw.extend(redis.lrange(name, 0, -1))
    unacked = unacked_messages(redis, delivered_since=delivered_since)
    messages = [json.loads(body) for body in raw] + unacked
    # Task protocol 2 carries the task id in the message headers.
    return {str(m.get("headers", {}).get("id")) for m in messages}
