"""The mount child's control socket: the mount.* methods that pxd calls on it.

pxd connects with the cluster secret handshake. The methods return the I/O counters and the
replication state, make the volume durable, grow it, and add or remove a replica for a change of
ha level.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pxfs.errors import InvalidArgument
from pxfs.mountdevice import Replicas, open_connection, resync_added
from pxfs.replication import ReplicationClient
from pxfs.rpc import read_secret
from pxfs.rpcserver import RpcServer
from pxfs.stats import IoMeter
from pxfs.volume.device import BlockDevice
from pxfs.volume.namespace import Volume


class _Control:
    """The handlers of the control socket that pxd calls."""

    def __init__(
        self, volume: Volume, meter: IoMeter, device: BlockDevice, replicas: Replicas | None
    ) -> None:
        self._volume = volume
        self._meter = meter
        self._device = device
        self._replicas = replicas

    def handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """Return the handlers by method name."""
        return {
            "mount.stats": self.stats,
            "mount.sync": self.sync,
            "mount.grow": self.grow,
            "mount.runtime_state": self.runtime_state,
            "mount.resync_progress": self.resync_progress,
            "mount.add_replica": self.add_replica,
            "mount.remove_replica": self.remove_replica,
        }

    async def stats(self) -> dict[str, Any]:
        """Return the I/O counters of this process and the requests in flight."""
        return self._meter.snapshot()

    async def sync(self, before_close: Any = False) -> dict[str, Any]:
        """Make every write and its metadata durable. After NoSpace, a later call tries again.

        With `before_close`, also raise Unavailable unless a write quorum of replicas is
        connected, because closing the volume writes to them.
        """
        if not isinstance(before_close, bool):
            raise InvalidArgument("mount.sync takes true or false for before_close")
        await self._volume.sync()
        if before_close and isinstance(self._device, ReplicationClient):
            await self._device.check_write_quorum()
        return {}

    async def runtime_state(self) -> dict[str, str]:
        """Return the replication runtime state (docs/replication.md), empty for a file device."""
        if isinstance(self._device, ReplicationClient):
            return self._device.runtime_state()
        return {}

    async def resync_progress(self) -> dict[str, dict[str, int]]:
        """Return the progress of each running resync, by replica id (empty for a file device)."""
        if isinstance(self._device, ReplicationClient):
            return self._device.resync_progress()
        return {}

    async def add_replica(self, replica_id: Any, address: Any, ha_level: Any) -> dict[str, bool]:
        """Connect to a new empty replica and start its full copy; a known replica is a no-op.

        The replica joins the write set, and the volume takes `ha_level`, once the copy is done.
        Returns {"added": False} when `replica_id` is a replica already.
        """
        replicas = self._require_replicas("mount.add_replica")
        if not isinstance(replica_id, str) or not replica_id or not isinstance(address, str):
            raise InvalidArgument("mount.add_replica takes a node id, an address and an ha level")
        if replica_id in replicas.addresses:
            return {"added": False}
        client = await open_connection(address, replicas.peer_socket, replicas.secret)
        try:
            added = replicas.device.add_replica(replica_id, client, _check_ha(ha_level))
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        if not added:
            await client.aclose()
            return {"added": False}
        replicas.clients.append(client)
        replicas.addresses[replica_id] = address
        replicas.nursery.start_soon(resync_added, replicas.device, replica_id)
        return {"added": True}

    async def remove_replica(self, replica_id: Any, ha_level: Any) -> dict[str, bool]:
        """Stop all I/O to a replica and drop it; returns once pxd recorded the write set."""
        replicas = self._require_replicas("mount.remove_replica")
        if not isinstance(replica_id, str):
            raise InvalidArgument("mount.remove_replica takes a node id and an ha level")
        if replica_id not in replicas.addresses:
            return {"removed": False}
        await replicas.device.remove_replica(replica_id, _check_ha(ha_level))
        del replicas.addresses[replica_id]
        return {"removed": True}

    def _require_replicas(self, method: str) -> Replicas:
        if self._replicas is None:
            raise InvalidArgument(
                f"{method}: the volume is mounted without replica ids, so its replica set is fixed"
            )
        return self._replicas

    async def grow(self, size: Any) -> dict[str, int]:
        """Grow the volume to `size` bytes; the size it already has is a no-op."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise InvalidArgument(f"mount.grow takes a size in bytes, not {size!r}")
        if size != self._volume.superblock.size:
            await self._volume.grow(size)
        return {"size": self._volume.superblock.size}


async def start_control(
    nursery: trio.Nursery,
    volume: Volume,
    meter: IoMeter,
    device: BlockDevice,
    replicas: Replicas | None,
    args: argparse.Namespace,
) -> None:
    """Serve the control socket before "ready", so pxd can connect as soon as it reads it."""
    server = RpcServer(
        _Control(volume, meter, device, replicas).handlers(),
        secret=read_secret(args.secret_file),
        name="mount control rpc",
    )
    await nursery.start(functools.partial(server.serve_unix, args.control_socket, mode=0o600))


def _check_ha(ha_level: Any) -> int:
    if isinstance(ha_level, bool) or ha_level not in (1, 2, 3):
        raise InvalidArgument(f"invalid ha level {ha_level!r}: it must be 1, 2 or 3")
    return int(ha_level)
