"""Binds of pxd's volumes: the mounts at their paths, beside each mount child's private mount.

Each mount child serves its volume at a private mountpoint under the data directory, and pxd
bind-mounts that at each path of the volume. These methods bind and unbind the paths, find the
binds of a dead child or of the last run of pxd, and bind a nested volume again when the mount
that its path is in was replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection

from pxfs.datadir import MOUNTS_DIR
from pxfs.errors import Busy, PxfsError
from pxfs.hostmounts import (
    bind,
    binds_of,
    is_mounted,
    lazy_unmount,
    leads_to_mount,
    mount_devices,
    mountinfo,
    parent_resolved,
    replace_with_bind,
    unmount,
)
from pxfs.nodebase import MountChild
from pxfs.sampling import StatsSampling

log = logging.getLogger(__name__)


def is_inside(path: str, directories: Collection[str]) -> bool:
    """Return whether `path` is below one of `directories` (not one of them)."""
    return any(path.startswith(directory.rstrip("/") + "/") for directory in directories)


class VolumeBinds(StatsSampling):
    """Binds the paths of each volume to the private mount of its mount child."""

    async def _detach_dead_paths(self, child: MountChild) -> None:
        for path in child.paths:
            if leads_to_mount(path, child.mountpoint):
                await lazy_unmount(path)
        await self._detach_dead_mount(child)

    async def _detach_dead_mount(self, child: MountChild) -> None:
        """Unmount a dead child's private mount and its moved binds, and keep its other binds.

        Until a new child's binds replace them, the kept binds fail every access with ENOTCONN,
        so that no write lands in the directory under a path.
        """
        devices = mount_devices()
        device = devices.get(parent_resolved(child.mountpoint, devices))
        if device is not None:
            child.dead_device = device
        await self._detach_moved_binds(child)
        await lazy_unmount(child.mountpoint)

    def _leads_to_volume(self, child: MountChild, path: str) -> bool:
        """True if `path` is a bind of the child's mount, or of the mount of a dead child."""
        if leads_to_mount(path, child.mountpoint):
            return True
        if child.dead_device is None:
            return False
        devices = mount_devices()
        return parent_resolved(path, devices) == path and devices.get(path) == child.dead_device

    async def _bind_paths(
        self, child: MountChild, paths: list[str], over_stale: Collection[str] = ()
    ) -> None:
        """Bind the child's mount at `paths`, beneath the stale mounts at `over_stale`.

        Then the volumes mounted inside those paths get their binds back, in a task of their
        own, because they lose them when the mount that they are in is replaced.
        """
        for path in paths:
            try:
                await self._bind_path(child, path, over_stale=path in over_stale)
            except PxfsError as exc:
                log.error(
                    "volume %s: cannot mount at %s again: %s", child.vol_id, path, exc.message
                )
        if child.paths:
            self._live_nursery().start_soon(self._restore_nested, child.vol_id, list(child.paths))

    async def _restore_nested(self, outer_id: str, outer_paths: list[str]) -> None:
        """Bind again the paths inside `outer_paths` of the other volumes that lost them.

        Replacing the mount at a path takes the mounts inside it along, and a bind into a volume
        whose child is down fails, while the catalog still lists the path.
        """
        try:
            records = await self._catalog().list_volumes()
        except PxfsError as exc:
            log.error("volume %s: cannot list the volumes inside it: %s", outer_id, exc.message)
            return
        # The shallowest paths go first: a bind of a deeper path made before the path it is
        # in would end up under that one's bind.
        inside = sorted(
            (
                (path, record["id"])
                for record in records
                if record["id"] != outer_id
                for path in record["mount_paths"]
                if is_inside(path, outer_paths)
            ),
            key=lambda item: item[0].count("/"),
        )
        for path, vol_id in inside:
            async with self._volume_locks[vol_id]:
                child = self._mounts.get(vol_id)
                if child is None or not child.running:
                    # Its own start or restart binds every path it has.
                    continue
                if leads_to_mount(path, child.mountpoint):
                    continue
                log.warning(
                    "volume %s: mounting at %s again, inside the mount of volume %s",
                    vol_id, path, outer_id,
                )  # fmt: skip
                with contextlib.suppress(ValueError):
                    child.paths.remove(path)
                await self._bind_paths(child, [path])

    async def _bind_path(self, child: MountChild, path: str, *, over_stale: bool = False) -> None:
        if over_stale or (child.dead_device is not None and self._leads_to_volume(child, path)):
            await replace_with_bind(child.mountpoint, path)
        else:
            await bind(child.mountpoint, path)
        child.paths.append(path)

    async def _unbind(self, child: MountChild, path: str, *, lazy_if_busy: bool) -> None:
        if not self._leads_to_volume(child, path):
            # Unmounting `path` now could unmount another filesystem. The volume's bind is
            # found by its device instead, at the place it was moved to.
            log.warning(
                "volume %s: %s no longer leads to the volume's mount (a directory on the way "
                "was moved or replaced by a symbolic link); not unmounting that path",
                child.vol_id,
                path,
            )
            with contextlib.suppress(ValueError):
                child.paths.remove(path)
            await self._detach_moved_binds(child)
            return
        if is_mounted(path):
            try:
                await unmount(path)
            except Busy:
                if not lazy_if_busy:
                    raise
                log.warning("volume %s: %s is busy; unmounting it lazily", child.vol_id, path)
                await lazy_unmount(path)
        with contextlib.suppress(ValueError):
            child.paths.remove(path)

    async def _detach_moved_binds(self, child: MountChild) -> None:
        """Lazily unmount the binds of the volume's mount that are at none of its paths."""
        # NOTE: a directory that is moved again between reading mountinfo and the unmount
        # still redirects it; the window is that of one umount(8) run.
        for path in binds_of(child.mountpoint):
            if path not in child.paths:
                log.warning("volume %s: lazily unmounting its moved bind at %s", child.vol_id, path)
                await lazy_unmount(path)

    async def _clear_orphan_mounts(self, attached_here: set[str]) -> None:
        """Lazily unmount the FUSE mounts, and their binds, of volumes not attached here.

        A crash of pxd leaves them behind, for instance when another node took the volume over
        meanwhile. A mount child that survived ends once the kernel drops its mount, and it
        cannot write before that, because the replicas reject its old epoch.
        """
        mounts_dir = os.path.realpath(self.data_dir / MOUNTS_DIR)
        devices = mount_devices()
        for mountpoint, device in devices.items():
            vol_id = os.path.basename(mountpoint)
            if os.path.dirname(mountpoint) != mounts_dir or vol_id in attached_here:
                continue
            # The binds are listed after the mount they bind, and they go first.
            binds = [path for path, other in devices.items() if other == device][::-1]
            log.warning(
                "volume %s is not attached here; lazily unmounting its stale mounts %s",
                vol_id,
                ", ".join(binds),
            )
            for path in binds:
                await lazy_unmount(path)

    def _stale_mount_at(self, path: str) -> bool:
        """Return whether a FUSE mount is on `path`; raise Busy where pxd must not mount."""
        # The stat of a mountpoint waits on a stopped mount child, so `path` itself is
        # resolved only when it is not a mountpoint.
        link = Busy(f"{path} now leads through a symbolic link; not remounting there")
        mountpoints = mountinfo()
        if parent_resolved(path, mountpoints) != path:
            raise link
        fstype = mountpoints.get(path)
        if fstype is None:
            if os.path.realpath(path) != path:
                raise link
            return False
        if not fstype.startswith("fuse"):
            raise Busy(f"{path} has a {fstype} filesystem mounted on it; not remounting there")
        return True

    async def _clear_stale_mount(self, path: str) -> None:
        if self._stale_mount_at(path):
            log.warning("lazily unmounting the stale mount at %s", path)
            await lazy_unmount(path)
