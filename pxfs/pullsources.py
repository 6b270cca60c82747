"""The replica store's connections to the stores of other nodes, which `store.pull` reads from.

The store keeps one RPC client per source node open between pulls, and drops it when a call
through it times out or its connection breaks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Protocol

import trio

from pxfs.errors import PxfsError, Unavailable
from pxfs.rpc import RpcClient

log = logging.getLogger(__name__)

#: Seconds that one `store.pull` may spend connecting to the source node and reading from it.
#: It stays below the 5 s after which a replication client drops a replica that has not
#: replied, so a pull from a slow source fails alone and the resync copies through the client.
PULL_TIMEOUT = 4.0


class PeerConnector(Protocol):
    """Opens authenticated peer RPC connections to the stores of other nodes, by node id."""

    def connect(self, node_ids: Sequence[str]) -> AbstractAsyncContextManager[list[RpcClient]]:
        """Return a context that opens one client per node id and closes them at its exit."""
        ...


class PullSources:
    """The RPC clients that `store.pull` reads through, one per source node, by node id."""

    def __init__(self, peers: PeerConnector) -> None:
        self._peers = peers
        #: Open connections to the stores of other nodes, by node id, each with the exit stack
        #: that closes it.
        self._sources: dict[str, tuple[RpcClient, AsyncExitStack]] = {}
        self._sources_lock = trio.Lock()

    async def read_versioned(self, source: str, vol_id: str, blocknos: list[int]) -> Any:
        """Call `store.read_versioned` on node `source`; raises Unavailable when it fails."""
        client = None
        try:
            with trio.fail_after(PULL_TIMEOUT):
                client = await self._source_client(source)
                return await client.call("store.read_versioned", vol_id, blocknos)
        except trio.TooSlowError:
            await self._drop_source(source)
            raise Unavailable(
                f"pull of volume {vol_id}: node {source} did not reply within {PULL_TIMEOUT:g} s"
            ) from None
        except PxfsError as exc:
            if client is None or client.broken:
                await self._drop_source(source)
            raise Unavailable(
                f"pull of volume {vol_id} from node {source} failed: {exc.message}"
            ) from None

    async def _source_client(self, source: str) -> RpcClient:
        async with self._sources_lock:
            opened = self._sources.get(source)
            if opened is not None and not opened[0].broken:
                return opened[0]
            if opened is not None:
                await opened[1].aclose()
            stack = AsyncExitStack()
            try:
                (client,) = await stack.enter_async_context(self._peers.connect([source]))
            except BaseException:
                await stack.aclose()
                raise
            self._sources[source] = (client, stack)
            log.info("connected to the store of node %s to pull blocks", source)
            return client

    async def _drop_source(self, source: str) -> None:
        opened = self._sources.pop(source, None)
        if opened is not None:
            with trio.CancelScope(shield=True):
                await opened[1].aclose()

    async def aclose(self) -> None:
        """Close the connections to every source node."""
        for source in list(self._sources):
            await self._drop_source(source)
