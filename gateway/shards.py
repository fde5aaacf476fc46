"""This instance's share of the shards: their leases and the windows of those it owns.

Each shard has one owner at a time: a lease in Redis (GATEWAY_FORWARD_LEASE), renewed
in the background every third of it, so a slow send does not lose it. The instances
alive (their heartbeats) share the shards evenly: `balance` takes the shards no one
owns up to this instance's share and gives back extra ones, and a shard whose owner
died is taken over within about a lease. Taking a shard over rebuilds its window from
its log and its retry hash (see gateway/window.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence

from .errors import StoreUnavailable
from .metrics import Metrics
from .settings import Settings
from .store import Store
from .window import ShardWindow

log = logging.getLogger("gateway.forwarder")


class Shards:
    """The shards this instance owns (`windows`), and the leases that make them its own."""

    def __init__(
        self, store: Store, settings: Settings, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.token = uuid.uuid4().hex  # this instance, in the shard leases
        self.windows: dict[int, ShardWindow] = {}
        self.failing: dict[int, float] = {}
        """Owned shards whose last read or commit failed -> since when (Unix seconds)."""
        self.held_until: dict[int, float] = {}
        """Owned shards -> until when their lease surely holds (from before the call that
        took or renewed it); past it, another instance may own the shard."""
        self._failing_said = -math.inf
        self.next_balance = 0.0  # when to balance again (0: at the next round)

    def drop(self, shard: int, why: str | None = None) -> None:
        """Forget a shard's window (its next owner rebuilds it from Redis); say why."""
        self.held_until.pop(shard, None)
        if self.windows.pop(shard, None) is not None and why:
            log.warning("shard %d %s; letting it go", shard, why)

    def lapsed(self, now: float) -> list[int]:
        """Owned shards whose lease may have run out (renewals failed, a node away): a
        send from their windows might race a new owner's, so they are let go and taken
        again, rebuilt from Redis, before anything of theirs is sent."""
        return [s for s in self.windows if self.held_until.get(s, 0.0) <= now]

    async def balance(self) -> None:
        """Own a fair share of the shards: take free ones, give back extra ones. Every
        third of a lease, so a shard whose owner died is taken over within about a lease."""
        now = self.clock()
        if now < self.next_balance:
            return
        try:
            instances = await self.store.heartbeat(self.token, now)
        except StoreUnavailable:
            if not self.windows:
                raise  # nothing to forward meanwhile: try again at the next round
            # The heartbeats' node is away (a cluster primary): the shards owned go on
            # forwarding, their nodes may be up; balanced again a lease step later.
            self.next_balance = now + self.lease_step()
            self.metrics.redis_errors.inc()
            log.warning("cannot balance shards (Redis away); forwarding the %d owned",
                        len(self.windows))  # fmt: skip
            return
        self.next_balance = now + self.lease_step()
        share = math.ceil(self.store.shards / instances)
        if len(self.windows) > share:
            idle = [s for s, w in self.windows.items() if not _sending(w)]
            extra = idle[: len(self.windows) - share]
            for shard in extra:
                del self.windows[shard]
            await self.store.let_go(extra, self.token)
            return
        if len(self.windows) == share:
            return
        others = (s for s in range(self.store.shards) if s not in self.windows)
        free = await self.store.unowned(others, self.token)
        random.shuffle(free)  # instances starting together take different shards first
        asked = self.clock()
        for shard in await self.store.acquire(free[: share - len(self.windows)], self.token):
            await self._take_over(shard)
            self.held_until[shard] = asked + self.settings.forward_lease

    async def _take_over(self, shard: int) -> None:
        """Start owning a shard: its predecessor's keys waiting for a retry, and its log
        from the start (copies already counted rebuild the window silently)."""
        await self.store.import_legacy(shard, self.token)
        counted, retries = await self.store.take_over(shard)
        window = ShardWindow(
            shard=shard,
            keys=self.store,
            merge_window_ms=self.store.merge_window_ms,
            dedup_window_ms=self.store.dedup_window_ms,
            early_flush=self.store.early_flush,
            history=self.store.keeps_history,
            counted_id=counted,
        )
        window.load_retries(retries)
        self.windows[shard] = window
        log.info("owning shard %d (%d key(s) waiting for a retry)", shard, len(retries))

    async def keep_leases(self) -> None:
        """Renew the leases apart from the loop, so a slow send does not lose them."""
        while True:
            await asyncio.sleep(self.lease_step())
            owned = list(self.windows)
            asked = self.clock()
            try:
                held = await self.store.renew(owned, self.token)
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("renewing shard leases failed")
                continue
            for shard, ours in held.items():
                if ours is False:
                    self.drop(shard, "is owned by another instance now")
                elif ours is True and shard in self.windows:
                    self.held_until[shard] = asked + self.settings.forward_lease

    def lease_step(self) -> float:
        return max(0.05, self.settings.forward_lease / 3)

    async def let_go_all(self) -> None:
        shards = list(self.windows)
        self.windows.clear()
        with contextlib.suppress(StoreUnavailable):
            await self.store.let_go(shards, self.token)
            await self.store.leave(self.token)

    def report_failing(self) -> None:
        self.metrics.unclaimable_shards.set(len(self.failing))
        since = min(self.failing.values(), default=None)
        self.metrics.unclaimable_seconds.set(0.0 if since is None else self.clock() - since)

    def note_failing(self, failures: dict[int, Exception], shards: Sequence[int]) -> None:
        """Keep `failing` up to date for the shards just tried, and say which fail, and
        since when: when that changes, and once a minute while it lasts."""
        now = self.clock()
        recovered = [s for s in shards if s in self.failing and s not in failures]
        if recovered:
            since = min(self.failing[s] for s in recovered)
            log.warning("shard(s) %s readable again, after %.1f s", shard_list(recovered),
                        now - since)  # fmt: skip
            for shard in recovered:
                del self.failing[shard]
        fresh = [s for s in failures if s not in self.failing]
        for shard in fresh:
            self.failing[shard] = now
        if failures and (fresh or time.monotonic() - self._failing_said > 60.0):
            self._failing_said = time.monotonic()
            failing = sorted(self.failing)
            log.warning(
                "cannot read %d of %d owned shards (%s) since %.1f s (%s); forwarding the others",
                len(failing), len(self.windows), shard_list(failing),
                now - min(self.failing.values()), failures[failing[0]],
            )  # fmt: skip



def _sending(window: ShardWindow) -> bool:
    return any(key.state == "sending" for key in window.pending.values())


def shard_list(shards: Sequence[int]) -> str:
    """Shards for a log line: 1, 4, 7 (the first twenty, and how many more)."""
    listed = ", ".join(str(shard) for shard in shards[:20])
    return listed if len(shards) <= 20 else f"{listed} and {len(shards) - 20} more"
