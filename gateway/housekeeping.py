"""Background loops every instance runs beside the forwarder: the gauge refresher and
the sweeper of forgotten fingerprints. Each logs and carries on when Redis is away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .errors import StoreUnavailable
from .metrics import Metrics
from .store import Store

# Named as before these loops left app.py: log filters select these lines by it.
log = logging.getLogger("gateway.app")

SWEEP_SECONDS = 300.0
GAUGE_REFRESH_SECONDS = 5.0


async def sweep_remembered(store: Store, clock: Callable[[], float]) -> None:
    """Remove forgotten fingerprints now and then; lookups already ignore them, this
    frees their memory. Every instance sweeps: the work is small and idempotent."""
    chunk = 256
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            for shard in range(store.shards):
                for start in range(0, store.dedup_buckets, chunk):
                    stop = min(start + chunk, store.dedup_buckets)
                    await store.sweep(clock(), shard, range(start, stop))
        except StoreUnavailable:
            pass  # the gauges count Redis errors; the next round sweeps again
        except Exception:
            log.exception("sweeping remembered keys failed")


async def refresh_gauges(store: Store, metrics: Metrics, clock: Callable[[], float]) -> None:
    """Gauges that need Redis, read in the background so a scrape never waits on Redis."""
    while True:
        try:
            backlog = await store.backlog(clock())
        except StoreUnavailable:
            metrics.redis_errors.inc()
            metrics.redis_up.set(0)
        except Exception:
            log.exception("could not refresh the backlog gauges")
            metrics.redis_up.set(0)
        else:
            metrics.pending.set(backlog.pending)
            metrics.dead_letters.set(backlog.dead_letters)
            metrics.forward_lag.set(backlog.lag)
            metrics.redis_up.set(1)
        await asyncio.sleep(GAUGE_REFRESH_SECONDS)
