"""A real three-primary Redis Cluster on loopback, for the tests that run on one.

The cluster itself is a `bench.cluster.LocalCluster` (the bench's scale-out
phases run on it too), which a `BreakableCluster` holds; the tests add what they
need to break it on purpose: emptying it whole, moving a slot as a resharding
would, and finding the primaries and waiting for a replica to take over a dead
one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import MovedError, ReadOnlyError

from bench.cluster import NODES, READY_TIMEOUT, LocalCluster, as_text, cluster_info
from gateway.embedded import EmbeddedRedis

__all__ = ["NODES", "BreakableCluster"]


class BreakableCluster:
    """The bench's cluster (same options), plus the tests' ways of disturbing it."""

    def __init__(self, **options: Any) -> None:
        self.cluster = LocalCluster(**options)

    @property
    def nodes(self) -> list[EmbeddedRedis]:
        """The primaries, then their replicas (see `bench.cluster.LocalCluster`)."""
        return self.cluster.nodes

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    async def start(self) -> None:
        await self.cluster.start()

    async def stop(self) -> None:
        await self.cluster.stop()

    async def wait_ok(self) -> None:
        """Until every node says the cluster is whole again (after a node came back)."""
        await self.cluster.wait_ok()

    async def flushall(self) -> None:
        """Empty every primary, gateways' leases included: each test starts its own
        gateways (replicas follow their primary, and refuse FLUSHALL)."""
        for url in self.urls:
            client = aioredis.Redis.from_url(url)
            try:
                with contextlib.suppress(ReadOnlyError):
                    await client.flushall()
            finally:
                await client.aclose()

    async def slot_counts(self) -> dict[int, int]:
        """Node index -> how many slots it serves, for every node serving some, as the
        first live node sees the cluster."""
        return {i: slots for i, (_role, slots) in (await self._nodes_view()).items() if slots}

    async def wait_promoted(self, dead: int) -> None:
        """Until the dead node `dead` serves no slots (a replica took them over) and every
        live node says the cluster is ok."""
        clients = [aioredis.Redis.from_url(u) for i, u in enumerate(self.urls) if i != dead]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        try:
            while True:
                view = await self._nodes_view(skip=dead)
                infos = [await cluster_info(c) for c in clients]
                if view.get(dead, ("", 1))[1] == 0 and all(
                    i.get("cluster_state") == "ok" for i in infos
                ):
                    return
                if loop.time() > deadline:
                    raise RuntimeError(f"no replica took over node {dead}: {view} {infos}")
                await asyncio.sleep(0.05)
        finally:
            for client in clients:
                await client.aclose()

    async def _nodes_view(self, skip: int = -1) -> dict[int, tuple[str, int]]:
        """Node index -> (master | slave, slots served), per CLUSTER NODES of a live node."""
        ports = [url.rsplit(":", 1)[1] for url in self.urls]
        url = next(u for i, u in enumerate(self.urls) if i != skip)
        client = aioredis.Redis.from_url(url)
        try:
            # redis-py parses CLUSTER NODES: "host:port" -> flags, slots as [first, last].
            nodes: dict[str, Any] = await client.execute_command("CLUSTER NODES")
        finally:
            await client.aclose()
        view = {}
        for address, node in nodes.items():
            role = "master" if "master" in node["flags"].split(",") else "slave"
            slots = sum(int(last) - int(first) + 1 for first, last in node["slots"])
            view[ports.index(address.rsplit(":", 1)[1])] = (role, slots)
        return view

    async def move_slot(self, slot: int, key: str, to: int) -> None:
        """Give an empty `slot` (the one of `key`) to node `to`, as a resharding would, and
        wait until every node agrees; a client's cached slot map is then stale (MOVED)."""
        clients = [aioredis.Redis.from_url(url) for url in self.urls]
        try:
            ids = [as_text(await c.execute_command("CLUSTER MYID")) for c in clients]
            owner = await self._owner(clients, key)
            if owner == to:
                return
            source, target = clients[owner], clients[to]
            await target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[owner])
            await source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[to])
            # NODE on the importing side first: it bumps its epoch, so its claim wins.
            await target.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to])
            await source.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + READY_TIMEOUT
            while await self._owner(clients, key) != to:
                if loop.time() > deadline:
                    raise RuntimeError(f"slot {slot} did not move to node {to}")
                await asyncio.sleep(0.05)
        finally:
            for client in clients:
                await client.aclose()

    async def owner(self, key: str) -> int:
        """The index of the node serving `key`, once every node agrees on it."""
        clients = [aioredis.Redis.from_url(url) for url in self.urls]
        try:
            return await self._owner(clients, key)
        finally:
            for client in clients:
                await client.aclose()

    async def _owner(self, clients: list[aioredis.Redis], key: str) -> int:
        """The node serving `key`, or -1 while the nodes disagree."""
        ports = [url.rsplit(":", 1)[1] for url in self.urls]
        views = []
        for i, client in enumerate(clients):
            try:
                await client.exists(key)
                views.append(i)
            except MovedError as exc:
                views.append(ports.index(str(exc).rsplit(":", 1)[1]))
        return views[0] if len(set(views)) == 1 else -1
