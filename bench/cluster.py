"""A real three-primary Redis Cluster on loopback, for the bench's scale-out phases and the tests.

Three `redis-server` processes in cluster mode, each in a short temporary
directory; the 16384 slots are split in three ranges, the nodes meet, and the
cluster is ready once every node says `cluster_state:ok`. With `replicas=1`,
three more nodes each replicate one primary (CLUSTER REPLICATE, as
`redis-cli --cluster create --cluster-replicas 1` would do), and the cluster is
ready once every replica's link to its primary is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import MovedError, ReadOnlyError, RedisError, ResponseError

from gateway.embedded import EmbeddedRedis
from gateway.store.keys import INSTANCES_KEY, LAYOUT_KEY

# What a reset between phases keeps: the running gateways' shard leases, heartbeats and
# the layout. A shard's owner holds its window in memory; with its lease gone (FLUSHALL)
# it would send what it read, fail to record that, and its next owner send it again.
KEPT = re.compile(rb"tkgw:\{\d+\}:owner|" + re.escape(INSTANCES_KEY.encode()) + b"|"
                  + re.escape(LAYOUT_KEY.encode()))  # fmt: skip
CLEAR_BATCH = 1000


async def clear_keys(client: aioredis.Redis) -> None:
    """Delete every key of one Redis node but those KEPT."""
    doomed: list[bytes] = []
    async for key in client.scan_iter(count=CLEAR_BATCH):
        if not KEPT.fullmatch(key):
            doomed.append(key)
    for start in range(0, len(doomed), CLEAR_BATCH):
        pipe = client.pipeline(transaction=False)
        for key in doomed[start : start + CLEAR_BATCH]:
            pipe.unlink(key)  # one key a command: a cluster node takes no cross-slot UNLINK
        await pipe.execute()

SLOTS = 16384
NODES = 3
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000
ADDSLOTS_CHUNK = 1000  # Redis 6.2 has no ADDSLOTSRANGE: many slots per ADDSLOTS instead
READY_TIMEOUT = 20.0


def primary_of(key: str) -> int:
    """The index of the node that serves `key` (the slots are split in equal ranges)."""
    return key_slot(key.encode()) * NODES // SLOTS


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A port whose bus port is free too; both stay below 65536 (hence at most 55000)."""
    for _ in range(200):
        port = random.randint(20_000, 55_000)
        if port not in taken and _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """Start, empty and stop a three-primary cluster; `url` points at its first node.

    `binary` is the redis-server to run (default: the gateway's own choice);
    `appendfsync` the nodes' append-only policy; `replicas` per primary (0 or 1):
    `nodes[NODES + i]` replicates `nodes[i]` when formed; `node_timeout` in ms is
    how long a primary may be unreachable before its replica takes over."""

    def __init__(
        self,
        binary: str | None = None,
        appendfsync: str = "no",
        *,
        replicas: int = 0,
        node_timeout: int = 2000,
    ) -> None:
        if replicas not in (0, 1):
            raise ValueError("replicas must be 0 or 1")
        self.binary = binary
        self.appendfsync = appendfsync
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.nodes: list[EmbeddedRedis] = []
        self.dirs: list[Path] = []

    @property
    def size(self) -> int:
        """How many nodes: the primaries and their replicas."""
        return NODES * (1 + self.replicas)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def pids(self) -> tuple[int, ...]:
        """The running nodes' pids."""
        return tuple(pid for node in self.nodes if (pid := node.pid) is not None)

    async def start(self) -> None:
        try:
            await self._start_nodes()
            await self._form()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
        self.nodes = []
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.dirs = []

    async def clear(self) -> None:
        """Empty every primary but for the gateways' leases (see `clear_keys`; replicas follow
        their primary, and send a delete to it: MOVED, passed over)."""
        for url in self.urls:
            client = aioredis.Redis.from_url(url)
            try:
                with contextlib.suppress(ReadOnlyError, MovedError):
                    await clear_keys(client)
            finally:
                await client.aclose()

    async def wait_ok(self) -> None:
        """Until every node says the cluster is whole (after a node came back): see
        `_wait_ok`."""
        clients = [aioredis.Redis.from_url(url) for url in self.urls]
        try:
            await self._wait_ok(clients)
        finally:
            for client in clients:
                await client.aclose()

    async def _start_nodes(self) -> None:
        taken: set[int] = set()
        for _ in range(self.size):
            for attempt in range(5):
                port = cluster_port(taken)
                data = Path(tempfile.mkdtemp(prefix="gwc"))
                self.dirs.append(data)
                node = EmbeddedRedis(
                    data,
                    port=port,
                    appendfsync=self.appendfsync,
                    binary=self.binary,
                    extra_args=[
                        *("--cluster-enabled", "yes"),
                        *("--cluster-config-file", str(data / "nodes.conf")),
                        *("--cluster-node-timeout", str(self.node_timeout)),
                    ],
                )
                try:
                    await node.start()
                except Exception:  # the port (or its bus port) was taken meanwhile
                    await node.stop()
                    if attempt == 4:
                        raise
                    continue
                taken.add(port)
                self.nodes.append(node)
                break

    async def _form(self) -> None:
        clients = [aioredis.Redis.from_url(url) for url in self.urls]
        try:
            bounds = [SLOTS * i // NODES for i in range(NODES + 1)]
            for i, client in enumerate(clients[:NODES]):
                slots = list(range(bounds[i], bounds[i + 1]))
                for start in range(0, len(slots), ADDSLOTS_CHUNK):
                    chunk = slots[start : start + ADDSLOTS_CHUNK]
                    await client.execute_command("CLUSTER ADDSLOTS", *chunk)
            first = clients[0]
            for node in self.nodes[1:]:
                port = int(node.url.rsplit(":", 1)[1])
                await first.execute_command("CLUSTER MEET", "127.0.0.1", port)
            await self._wait_ok(clients[:NODES], known=self.size)
            if self.replicas:
                ids = [as_text(await c.execute_command("CLUSTER MYID")) for c in clients]
                for i, replica in enumerate(clients[NODES:]):
                    # The replica must know its primary first: wait until it does.
                    await _until(
                        lambda r=replica, i=i: _replicate(r, ids[i]), "a replica to attach"
                    )
            await self._wait_ok(clients, known=self.size)
        finally:
            for client in clients:
                await client.aclose()

    async def _wait_ok(self, clients: list[aioredis.Redis], known: int | None = None) -> None:
        """Until every node says the cluster is ok and knows `known` nodes (all of them),
        and every replica among them has its link to its primary up."""

        async def ok() -> bool:
            # redis-py parses CLUSTER INFO into a dict of strings.
            infos = [await cluster_info(c) for c in clients]
            if not all(
                i.get("cluster_state") == "ok"
                and i.get("cluster_known_nodes") == str(known or self.size)
                for i in infos
            ):
                return False
            for client in clients:
                try:
                    info = await client.info("replication")
                    aof = await client.info("persistence")
                except (RedisError, OSError):  # a node still starting
                    return False
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
                # A replica rewrites its AOF after a full sync, and refuses to shut down
                # until that is done ("Writing initial AOF, can't exit").
                if aof.get("aof_rewrite_in_progress") or aof.get("aof_rewrite_scheduled"):
                    return False
            return True

        await _until(ok, "the cluster to be ready")


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while not await condition():
        if loop.time() > deadline:
            raise RuntimeError(f"waited {READY_TIMEOUT:g}s for {what}")
        await asyncio.sleep(0.05)


async def _replicate(replica: aioredis.Redis, primary_id: str) -> bool:
    """Make `replica` replicate the node `primary_id`; False while it does not know it yet."""
    try:
        await replica.execute_command("CLUSTER REPLICATE", primary_id)
    except ResponseError as exc:
        if "Unknown node" in str(exc):
            return False
        raise
    return True


def as_text(value: object) -> str:
    """A reply as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def cluster_info(client: aioredis.Redis) -> dict[str, str]:
    """A node's CLUSTER INFO (redis-py parses it into a dict of strings); {} while the
    node does not answer."""
    try:
        info: dict[str, str] = await client.execute_command("CLUSTER INFO")
    except (RedisError, OSError):  # a node still starting
        return {}
    return info
