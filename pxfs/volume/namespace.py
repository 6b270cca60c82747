"""The Volume: a POSIX namespace and file data on top of the tree, journal and block cache.

Volume is the last of three layers. `VolumeBase` (pxfs/volume/volumebase.py) holds the state
and does open, close, grow and flushing. `FileData` (pxfs/volume/filedata.py) reads, writes and
truncates files. This module adds lookups, directory operations, rename, setattr and xattrs.

Every operation checks its arguments, builds the list of tree changes it makes, and commits them
as one journal record. The commit is a single step with no await in it, so an operation is
either wholly in the tree and the journal or not at all. Asynchronous operations (read, write,
truncate) first await what they need (cached blocks, write-back room) and then re-check the
state before they commit. docs/volume-format.md gives the durability rules.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from pxfs.errors import (
    AlreadyExists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    RangeError,
    TooManyLinks,
)
from pxfs.volume.device import BLOCK_SIZE
from pxfs.volume.filedata import FileData
from pxfs.volume.format import NAME_MAX, ROOT_INO, SYMLINK_MAX
from pxfs.volume.inodes import (
    DROP_INODE,
    SET_ENTRY,
    SET_XATTR,
    UNMAP_FROM,
    Change,
    Inode,
    new_inode_record,
)
from pxfs.volume.volumebase import now_ns

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
LINK_MAX = 65000
XATTR_VALUE_MAX = 65536
#: The total size of the xattr names and values of one inode.
XATTR_INODE_MAX = 256 * 1024
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
DIRECTORY_SIZE = 4096


@dataclass(slots=True)
class Attr:
    """The attributes of an inode, as stat(2) reports them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes exceeds {NAME_MAX}")
    if not name or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid file name {name!r}")


class Volume(FileData):
    """A mounted volume: the in-memory tree, its journal, the block cache and the allocator."""

    # Lookups

    def _dir(self, ino: int) -> Inode:
        inode = self._tree.get(ino)
        if not inode.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        return inode

    def _live_dir(self, ino: int) -> Inode:
        inode = self._dir(ino)
        if inode.nlink == 0:
            raise NotFound(f"directory {ino} has been removed")
        return inode

    def _entry(self, parent: Inode, name: bytes) -> Inode:
        assert parent.entries is not None
        child = parent.entries.get(name)
        if child is None:
            raise NotFound(f"{name!r} does not exist in directory {parent.ino}")
        return self._tree.inodes[child]

    def attr(self, inode: Inode) -> Attr:
        """Return the attributes of an inode."""
        if inode.is_dir:
            size = DIRECTORY_SIZE
        else:
            size = inode.size
        blocks = len(inode.blocks) * (BLOCK_SIZE // 512) if inode.blocks else 0
        return Attr(
            inode.ino,
            inode.mode,
            inode.nlink,
            inode.uid,
            inode.gid,
            inode.rdev,
            size,
            blocks,
            inode.atime_ns,
            inode.mtime_ns,
            inode.ctime_ns,
            inode.generation,
        )

    def getattr(self, ino: int) -> Attr:
        """Return the attributes of inode `ino`."""
        return self.attr(self._inode(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Return the attributes of `name` in `parent` and count one kernel lookup of it."""
        directory = self._dir(parent)
        if name == b".":
            inode = directory
        elif name == b"..":
            inode = self._inode(directory.parent)
        else:
            _check_name(name)
            inode = self._entry(directory, name)
        self.remember(inode.ino)
        return self.attr(inode)

    def remember(self, ino: int) -> None:
        """Count one kernel lookup of `ino` (a readdirplus entry, a new entry)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop `nlookup` kernel lookups, and an unlinked inode when none is left."""
        left = self._lookups.get(ino, 0) - nlookup
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        inode = self._tree.inodes.get(ino)
        if inode is not None and inode.nlink == 0 and ino != ROOT_INO:
            self._commit([[DROP_INODE, ino]])

    def _unless_used(self, inode: Inode, nlink: int, now: int) -> list[Change]:
        """Return the changes that release an inode left with `nlink` links.

        An inode the kernel no longer knows is dropped. One that it still knows but nobody has
        open loses its data now, as on ext4, rather than when the kernel's forget comes.
        """
        if nlink:
            return []
        if inode.ino not in self._lookups:
            return [[DROP_INODE, inode.ino]]
        if inode.blocks and inode.ino not in self._open:
            return [[UNMAP_FROM, inode.ino, 0], inode.record(nlink=0, size=0, ctime_ns=now)]
        return []

    def opened(self, ino: int) -> None:
        """Count one open file handle of `ino`."""
        self._inode(ino)
        self._open[ino] = self._open.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        """Drop one open file handle; an unlinked file loses its data with the last one."""
        left = self._open.get(ino, 0) - 1
        if left > 0:
            self._open[ino] = left
            return
        self._open.pop(ino, None)
        inode = self._tree.inodes.get(ino)
        if inode is not None and inode.nlink == 0 and inode.blocks:
            self._commit([[UNMAP_FROM, ino, 0], inode.record(size=0)])

    # Creating entries

    def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attr:
        """Create a regular file, fifo, socket or device node."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise InvalidArgument(f"create cannot make a file of type {kind:o}")
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        return self._make(parent, name, kind | (mode & 0o7777), uid, gid, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """Create a directory."""
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        """Create a symbolic link to `target`."""
        if len(target) > SYMLINK_MAX:
            raise NameTooLong(f"symlink target of {len(target)} bytes exceeds {SYMLINK_MAX}")
        if not target or b"\0" in target:
            raise InvalidArgument("a symlink target must be non-empty and contain no NUL")
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def _make(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Attr:
        directory = self._live_dir(parent)
        _check_name(name)
        assert directory.entries is not None
        if name in (b".", b"..") or name in directory.entries:
            raise AlreadyExists(f"{name!r} already exists in directory {parent}")
        if len(self._tree.inodes) >= self._geometry.max_inodes:
            raise NoSpace(f"the volume has reached its limit of {self._geometry.max_inodes} inodes")
        self._check_image_room()
        if directory.mode & stat.S_ISGID:
            gid = directory.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = now_ns()
        ino = self._tree.next_ino
        subdir = 1 if stat.S_ISDIR(mode) else 0
        self._commit(
            [
                new_inode_record(ino, mode, uid, gid, now, rdev=rdev, target=target),
                [SET_ENTRY, parent, name, ino],
                directory.record(nlink=directory.nlink + subdir, mtime_ns=now, ctime_ns=now),
            ]
        )
        self.remember(ino)
        return self.getattr(ino)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        """Add a hard link `new_name` in `new_parent` to inode `ino`."""
        inode = self._inode(ino)
        if inode.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        directory = self._live_dir(new_parent)
        _check_name(new_name)
        assert directory.entries is not None
        if new_name in directory.entries:
            raise AlreadyExists(f"{new_name!r} already exists in directory {new_parent}")
        if inode.nlink == 0:
            raise NotFound(f"inode {ino} has no links left to add to")
        if inode.nlink >= LINK_MAX:
            raise TooManyLinks(f"inode {ino} already has {inode.nlink} links")
        self._check_image_room()
        now = now_ns()
        self._commit(
            [
                inode.record(nlink=inode.nlink + 1, ctime_ns=now),
                [SET_ENTRY, new_parent, new_name, ino],
                directory.record(mtime_ns=now, ctime_ns=now),
            ]
        )
        self.remember(ino)
        return self.getattr(ino)

    # Removing entries

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory entry; the inode stays while the kernel looks it up."""
        directory = self._dir(parent)
        child = self._entry(directory, name)
        if child.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        now = now_ns()
        nlink = child.nlink - 1
        self._commit(
            [
                [SET_ENTRY, parent, name, 0],
                directory.record(mtime_ns=now, ctime_ns=now),
                child.record(nlink=nlink, ctime_ns=now),
                *self._unless_used(child, nlink, now),
            ]
        )

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory."""
        if name == b".":
            raise InvalidArgument("cannot remove '.'")
        if name == b"..":
            raise NotEmpty("cannot remove '..'")
        directory = self._dir(parent)
        child = self._entry(directory, name)
        if not child.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if child.entries:
            raise NotEmpty(f"directory {name!r} is not empty")
        now = now_ns()
        self._commit(
            [
                [SET_ENTRY, parent, name, 0],
                directory.record(nlink=directory.nlink - 1, mtime_ns=now, ctime_ns=now),
                child.record(nlink=0, ctime_ns=now),
                *self._unless_used(child, 0, now),
            ]
        )

    # Renaming

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        """Rename an entry; flags RENAME_NOREPLACE or RENAME_EXCHANGE as in renameat2(2)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise InvalidArgument(f"invalid rename flags {flags:#x}")
        source_dir = self._dir(old_parent)
        target_dir = self._dir(new_parent)
        _check_name(new_name)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise InvalidArgument("cannot rename '.' or '..'")

        moved = self._entry(source_dir, old_name)
        assert target_dir.entries is not None
        target_ino = target_dir.entries.get(new_name)
        target = self._tree.inodes[target_ino] if target_ino is not None else None

        if flags & RENAME_EXCHANGE:
            if target is None:
                raise NotFound(f"{new_name!r} does not exist in directory {new_parent}")
            self._exchange(source_dir, old_name, moved, target_dir, new_name, target)
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise AlreadyExists(f"{new_name!r} already exists in directory {new_parent}")
        if target is not None and target.ino == moved.ino:
            return

        self._check_replace(moved, target)
        if moved.is_dir:
            self._check_not_inside(moved, target_dir)
        if target_dir.nlink == 0:
            raise NotFound(f"directory {new_parent} has been removed")
        self._commit(
            self._rename_changes(source_dir, old_name, moved, target_dir, new_name, target)
        )

    def _check_replace(self, moved: Inode, target: Inode | None) -> None:
        if target is None:
            return
        if moved.is_dir and not target.is_dir:
            raise NotADirectory("cannot replace a non-directory with a directory")
        if not moved.is_dir and target.is_dir:
            raise IsADirectory("cannot replace a directory with a non-directory")
        if target.entries:
            raise NotEmpty("the directory to replace is not empty")

    def _check_not_inside(self, directory: Inode, destination: Inode) -> None:
        """Raise InvalidArgument if `destination` is `directory` or lies below it."""
        ino, steps = destination.ino, 0
        while True:
            if ino == directory.ino:
                raise InvalidArgument("cannot move a directory into itself")
            if ino == ROOT_INO or steps > len(self._tree.inodes):
                return
            ino = self._tree.inodes[ino].parent
            steps += 1

    def _rename_changes(
        self,
        source_dir: Inode,
        old_name: bytes,
        moved: Inode,
        target_dir: Inode,
        new_name: bytes,
        target: Inode | None,
    ) -> list[Change]:
        now = now_ns()
        links = {source_dir.ino: source_dir.nlink, target_dir.ino: target_dir.nlink}
        if moved.is_dir:
            links[source_dir.ino] -= 1
            links[target_dir.ino] += 1
        changes: list[Change] = [
            [SET_ENTRY, source_dir.ino, old_name, 0],
            [SET_ENTRY, target_dir.ino, new_name, moved.ino],
            moved.record(ctime_ns=now),
        ]
        if target is not None:
            nlink = 0 if target.is_dir else target.nlink - 1
            if target.is_dir:
                links[target_dir.ino] -= 1
            changes.append(target.record(nlink=nlink, ctime_ns=now))
            changes += self._unless_used(target, nlink, now)
        for directory in {source_dir.ino: source_dir, target_dir.ino: target_dir}.values():
            changes.append(directory.record(nlink=links[directory.ino], mtime_ns=now, ctime_ns=now))
        return changes

    def _exchange(
        self,
        source_dir: Inode,
        old_name: bytes,
        first: Inode,
        target_dir: Inode,
        new_name: bytes,
        second: Inode,
    ) -> None:
        if first.ino == second.ino:
            return
        if source_dir.ino != target_dir.ino:
            if first.is_dir:
                self._check_not_inside(first, target_dir)
            if second.is_dir:
                self._check_not_inside(second, source_dir)
        now = now_ns()
        links = {source_dir.ino: source_dir.nlink, target_dir.ino: target_dir.nlink}
        if source_dir.ino != target_dir.ino:
            shift = int(first.is_dir) - int(second.is_dir)
            links[source_dir.ino] -= shift
            links[target_dir.ino] += shift
        changes: list[Change] = [
            [SET_ENTRY, source_dir.ino, old_name, second.ino],
            [SET_ENTRY, target_dir.ino, new_name, first.ino],
            first.record(ctime_ns=now),
            second.record(ctime_ns=now),
        ]
        for directory in {source_dir.ino: source_dir, target_dir.ino: target_dir}.values():
            changes.append(directory.record(nlink=links[directory.ino], mtime_ns=now, ctime_ns=now))
        self._commit(changes)

    # Attributes

    async def setattr(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        """Change attributes. A smaller size frees the blocks past it and zeroes the tail."""
        inode = self._inode(ino)
        if size is not None:
            self._check_resize(inode, size)
            inode = await self._load_tail(ino, size)
        now = now_ns()
        fields: dict[str, Any] = {"ctime_ns": now if ctime_ns is None else ctime_ns}
        if mode is not None:
            fields["mode"] = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if uid is not None:
            fields["uid"] = uid
        if gid is not None:
            fields["gid"] = gid
        if atime_ns is not None:
            fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
        changes: list[Change] = []
        if size is not None:
            # Like ext4, a truncate sets mtime even when the size stays the same.
            if mtime_ns is None:
                fields["mtime_ns"] = now
            exposed = self._exposed_tail(inode, size)
            if exposed is not None:
                self._zero_exposed_tail(inode, exposed)
            fields["size"] = size
            changes += self._truncate_changes(inode, size)
        changes.insert(0, inode.record(**fields))
        self._commit(changes)
        return self.attr(inode)

    def readlink(self, ino: int) -> bytes:
        """Return the target of a symbolic link."""
        inode = self._inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise InvalidArgument(f"inode {ino} is not a symbolic link")
        target: bytes = inode.target
        return target

    def opendir(self, ino: int) -> list[tuple[bytes, int]]:
        """Return a snapshot of a directory's entries, `.` and `..` first."""
        directory = self._dir(ino)
        assert directory.entries is not None
        return [(b".", ino), (b"..", directory.parent), *directory.entries.items()]

    # Extended attributes

    def _check_xattr_name(self, name: bytes) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise NotSupported(f"xattr namespace of {name!r} is not supported")
        if len(name) > NAME_MAX:
            raise RangeError(f"xattr name of {len(name)} bytes exceeds {NAME_MAX}")
        if name.endswith(b".") and name.count(b".") == 1:
            raise InvalidArgument(f"xattr name {name!r} has no name after its namespace")

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set an extended attribute; flags XATTR_CREATE or XATTR_REPLACE as in setxattr(2)."""
        inode = self._inode(ino)
        self._check_xattr_name(name)
        if len(value) > XATTR_VALUE_MAX:
            raise RangeError(f"xattr value of {len(value)} bytes exceeds {XATTR_VALUE_MAX}")
        current = inode.xattrs or {}
        if flags & XATTR_CREATE and name in current:
            raise AlreadyExists(f"xattr {name!r} already exists")
        if flags & XATTR_REPLACE and name not in current:
            raise NoAttribute(f"xattr {name!r} does not exist")
        total = sum(len(key) + len(data) for key, data in current.items() if key != name)
        if total + len(name) + len(value) > XATTR_INODE_MAX:
            raise NoSpace(f"the xattrs of inode {ino} would exceed {XATTR_INODE_MAX} bytes")
        self._check_image_room()
        self._commit([[SET_XATTR, ino, name, bytes(value)], inode.record(ctime_ns=now_ns())])

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Return the value of an extended attribute."""
        inode = self._inode(ino)
        self._check_xattr_name(name)
        value = (inode.xattrs or {}).get(name)
        if value is None:
            raise NoAttribute(f"xattr {name!r} does not exist")
        return value

    def listxattr(self, ino: int, *, privileged: bool = True) -> list[bytes]:
        """Return the xattr names; trusted.* only to a privileged caller, as ext4 does."""
        names = list((self._inode(ino).xattrs or {}).keys())
        if not privileged:
            names = [name for name in names if not name.startswith(b"trusted.")]
        return names

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an extended attribute."""
        inode = self._inode(ino)
        self._check_xattr_name(name)
        if name not in (inode.xattrs or {}):
            raise NoAttribute(f"xattr {name!r} does not exist")
        self._commit([[SET_XATTR, ino, name, None], inode.record(ctime_ns=now_ns())])

    # Space

    def statfs(self) -> dict[str, int]:
        """Return file system statistics of the data region."""
        free = self._alloc.free_blocks + self._alloc.pending_blocks
        max_inodes = self._geometry.max_inodes
        return {
            "block_size": BLOCK_SIZE,
            "blocks": self._geometry.data_blocks,
            "free": free,
            "files": max_inodes,
            "free_files": max(0, max_inodes - len(self._tree.inodes)),
            "name_max": NAME_MAX,
        }
