"""An admin's change to a user's egress identity, told to every server at once.

Each gateway keeps a user's route for a few seconds (egress/service.py's UserRoutes), so that a tunnel does
not cost a database read. The server where the admin made the change forgets it at once; with several
servers the others hear of it here, through Redis publish/subscribe, and forget it too, so the user's next
tunnel on any server leaves by the new identity. A message lost while Redis is away costs at most the cache's
few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

CHANNEL = "polydev:egress:route-changed"
RETRY_S = 2.0


class RouteChanges:
    def __init__(self, client: aioredis.Redis, forget: Callable[[uuid.UUID], None], channel: str = CHANNEL) -> None:
        self._redis = client
        self._forget = forget
        self._channel = channel
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self.subscribed = asyncio.Event()  # set once the subscription is in place (tests wait for it)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="egress-route-changes")

    def announce(self, user_id: uuid.UUID) -> None:
        """Tell every server (this one included) that `user_id`'s identity changed; returns at once."""
        task = asyncio.get_running_loop().create_task(self._publish(user_id))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(self, user_id: uuid.UUID) -> None:
        try:
            await self._redis.publish(self._channel, str(user_id))
        except (RedisError, OSError) as exc:
            log.warning("egress_route_change_not_sent", user_id=str(user_id), reason=str(exc))

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        with contextlib.suppress(ValueError):
                            self._forget(uuid.UUID(str(message["data"])))
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("egress_route_changes_unavailable", reason=str(exc))
                await asyncio.sleep(RETRY_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def close(self) -> None:
        for task in [self._task, *self._sends]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
