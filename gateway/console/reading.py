"""The console's reads: the per-minute tallies the shard owners write (console/tally.py),
TikTok's last answers, and the shards' bounded /debug history, turned into the views of
console/views.py. Reads only, from Redis: every instance shows the same numbers.
"""

from __future__ import annotations

from ..store import Store
from .views import Check, LiveKey, Overview, Range


class ConsoleReader:
    """Reads what the console shows from the store's Redis."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def overview(self, pixel: str | None, range_: Range, now: float) -> Overview:
        """One pixel's (or all pixels', `pixel` None) numbers over a range ending now."""
        raise NotImplementedError

    async def checks(self, pixel: str | None, now: float) -> list[Check]:
        """The setup checks of one pixel (or all), over the last 24 hours."""
        raise NotImplementedError

    async def live(
        self,
        now: float,
        *,
        pixel: str | None = None,
        event: str | None = None,
        event_id: str | None = None,
        limit: int = 50,
    ) -> list[LiveKey]:
        """Recent keys, newest first, filtered by pixel, event name and event_id (exact)."""
        raise NotImplementedError
