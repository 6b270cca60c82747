"""The metadata model of a volume: the `Tree` of inodes and the run encoding of block maps.

The metadata of a mounted volume lives in memory as a `Tree` of `Inode` objects. The tree changes
only through `Tree.apply`, one change at a time, both while mounted and during journal replay,
so the replayed state is exactly the state that the journal records describe. A checkpoint
stores the whole tree as one msgpack image (`Tree.encode`, `Tree.decode`).
"""

from __future__ import annotations

import gc
import itertools
import operator
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from pxfs.errors import Corrupted, NotFound
from pxfs.volume.format import (
    FORMAT_VERSION,
    MAX_DEVICE_BLOCKS,
    MAX_FILE_BLOCKS,
    NAME_MAX,
    ROOT_INO,
    Geometry,
    is_int,
)
from pxfs.volume.inodes import (
    DROP_INODE,
    MAP_BLOCKS,
    SET_ENTRY,
    SET_INODE,
    SET_XATTR,
    UNMAP_FROM,
    Change,
    Inode,
    check_inode_records,
    inode_record_valid,
    new_inode_record,
)


def _check_name(name: Any) -> None:
    if type(name) is not bytes or not 0 < len(name) <= NAME_MAX:
        raise ValueError(f"invalid entry name {name!r:.40}: expected 1 to {NAME_MAX} bytes")


class Tree:
    """The metadata of a volume: inodes, directory entries, block maps and xattrs."""

    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO + 1
        #: The entries of all block maps together: mapped file blocks, not device blocks.
        self.mapped_blocks = 0

    @classmethod
    def new(cls, now_ns: int, uid: int = 0, gid: int = 0) -> Tree:
        """Return the tree of a fresh volume: an empty root directory."""
        tree = cls()
        tree.apply(new_inode_record(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, now_ns))
        return tree

    def get(self, ino: int) -> Inode:
        """Return inode `ino`; raises NotFound."""
        try:
            return self.inodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino} does not exist") from None

    def apply(self, change: Change, geometry: Geometry | None = None) -> list[int]:
        """Apply one change; return the device blocks that it unmapped.

        With `geometry`, as when replaying the journal, a block map must stay inside its data
        region. Raises Corrupted for a change that does not apply, which may leave the tree
        half changed.
        """
        try:
            handler = _APPLY[change[0]]
        except (KeyError, IndexError, TypeError):
            raise Corrupted(f"unknown metadata change {change!r:.80}") from None
        try:
            # The runs are checked before any is expanded into the map: one digest-valid run
            # of 10**12 blocks must not take that long or that much memory.
            if change[0] == MAP_BLOCKS:
                _check_runs(change[2], geometry)
            freed = handler(self, change)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise Corrupted(
                f"metadata change {change!r:.80} does not apply: {type(exc).__name__}: {exc}"
            ) from None
        _check_mapped_total(self, geometry)
        return freed

    def _set_inode(self, change: Change) -> list[int]:
        record = change[1:]
        if not inode_record_valid(record):
            check_inode_records([record])
            raise ValueError(f"invalid inode record {record!r:.80}")
        inode = self.inodes.get(record[0])
        if inode is None:
            self.inodes[record[0]] = Inode(record)
            self.next_ino = max(self.next_ino, record[0] + 1)
        elif stat.S_IFMT(record[1]) != stat.S_IFMT(inode.mode):
            raise ValueError("the change would alter the inode's type")
        else:
            inode.set_record(record)
        return []

    def _set_entry(self, change: Change) -> list[int]:
        _, parent_ino, name, child_ino = change
        _check_name(name)
        entries = self.inodes[parent_ino].entries
        if entries is None:
            raise ValueError(f"inode {parent_ino} is not a directory")
        if child_ino == 0:
            del entries[name]
            return []
        child = self.inodes.get(child_ino)
        if child is None:
            raise ValueError(
                f"entry {name!r} in directory {parent_ino} points to missing inode {child_ino}"
            )
        entries[name] = child_ino
        if child.is_dir:
            child.parent = parent_ino
        return []

    def _map_blocks(self, change: Change) -> list[int]:
        _, ino, runs = change
        blocks = self.inodes[ino].blocks
        if blocks is None:
            raise ValueError(f"inode {ino} is not a regular file")
        before = len(blocks)
        replaced = []
        for findex, blockno, count in _triples(runs):
            for offset in range(count):
                old = blocks.get(findex + offset)
                if old is not None:
                    replaced.append(old)
                blocks[findex + offset] = blockno + offset
        self.mapped_blocks += len(blocks) - before
        return replaced

    def _unmap_from(self, change: Change) -> list[int]:
        _, ino, first = change
        blocks = self.inodes[ino].blocks
        if blocks is None:
            raise ValueError(f"inode {ino} is not a regular file")
        doomed = [findex for findex in blocks if findex >= first]
        self.mapped_blocks -= len(doomed)
        return [blocks.pop(findex) for findex in doomed]

    def _set_xattr(self, change: Change) -> list[int]:
        _, ino, name, value = change
        if type(name) is not bytes or not (value is None or type(value) is bytes):
            raise ValueError(f"invalid xattr {name!r:.40}: the name and value must be bytes")
        inode = self.inodes[ino]
        if value is None:
            if inode.xattrs is not None:
                del inode.xattrs[name]
                if not inode.xattrs:
                    inode.xattrs = None
            return []
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[name] = value
        return []

    def _drop_inode(self, change: Change) -> list[int]:
        inode = self.inodes[change[1]]
        if inode.entries:
            raise ValueError(f"directory {inode.ino} still has entries")
        if inode.ino == ROOT_INO:
            raise ValueError("the root directory cannot be dropped")
        del self.inodes[inode.ino]
        if not inode.blocks:
            return []
        self.mapped_blocks -= len(inode.blocks)
        return list(inode.blocks.values())

    def encode(self) -> bytes:
        """Return the whole tree as a msgpack image for a checkpoint."""
        with _collector_paused():
            return self._encode()

    def _encode(self) -> bytes:
        inodes, entries, maps, xattrs = [], [], [], []
        for inode in self.inodes.values():
            inodes.append(inode.fields())
            if inode.entries:
                entries.append(
                    [inode.ino, [item for pair in inode.entries.items() for item in pair]]
                )
            if inode.blocks:
                maps.append([inode.ino, encode_runs(inode.blocks)])
            if inode.xattrs:
                xattrs.append([inode.ino, [item for pair in inode.xattrs.items() for item in pair]])
        image = {
            "version": FORMAT_VERSION,
            "next_ino": self.next_ino,
            "inodes": inodes,
            "entries": entries,
            "maps": maps,
            "xattrs": xattrs,
        }
        encoded: bytes = msgpack.packb(image)
        return encoded

    @classmethod
    def decode(cls, image: bytes, geometry: Geometry | None = None) -> Tree:
        """Rebuild a tree from `encode()` output; raises Corrupted.

        With `geometry`, every block map must lie inside its data region.
        """
        # NOTE: without a geometry, only MAX_DEVICE_BLOCKS bounds the block maps, which is more
        # entries than memory holds, so a reader of an untrusted device passes its geometry.
        try:
            with _collector_paused():
                fields = msgpack.unpackb(image, strict_map_key=False)
                return cls._from_fields(fields, geometry)
        except (KeyError, IndexError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise Corrupted(
                f"the checkpoint image is invalid: {type(exc).__name__}: {exc}"
            ) from None

    @classmethod
    def _from_fields(cls, fields: dict[str, Any], geometry: Geometry | None) -> Tree:
        if fields["version"] != FORMAT_VERSION:
            raise Corrupted(f"unsupported checkpoint version {fields['version']!r:.40}")
        tree = cls()
        tree._load_inodes(fields["inodes"])
        directories = {ino for ino, inode in tree.inodes.items() if inode.entries is not None}
        for ino, flat in fields["entries"]:
            tree._load_entries(ino, flat[0::2], flat[1::2], directories)
        maps = fields["maps"]
        if not all(type(runs) is list and len(runs) % 3 == 0 for _, runs in maps):
            raise ValueError("a block map is not a list of triples")
        # One check of all runs together, before any is expanded, also bounds the total.
        _check_runs(list(itertools.chain.from_iterable(runs for _, runs in maps)), geometry)
        for ino, runs in maps:
            tree._load_map(ino, runs)
        for ino, flat in fields["xattrs"]:
            for index in range(0, len(flat), 2):
                tree._set_xattr([SET_XATTR, ino, flat[index], flat[index + 1]])
        next_ino = fields["next_ino"]
        if not is_int(next_ino) or not ROOT_INO < next_ino <= 2**64:
            raise Corrupted(f"the checkpoint's next_ino {next_ino!r:.40} is invalid")
        tree.next_ino = max(next_ino, max(tree.inodes, default=0) + 1)
        if ROOT_INO not in tree.inodes or not tree.inodes[ROOT_INO].is_dir:
            raise Corrupted("the checkpoint has no root directory")
        return tree

    def _load_inodes(self, records: list[Any]) -> None:
        """Add the inodes of a checkpoint, emptying `records` as it goes."""
        check_inode_records(records)
        # Each record is dropped once its inode exists, so the memory of the records is reused
        # for the inodes. With a million inodes that lowers the peak by about 150 MiB. Popping
        # from the end of the reversed list keeps the order of the image.
        records.reverse()
        inodes = self.inodes
        pop = records.pop
        while records:
            record = pop()
            inodes[record[0]] = Inode(record)

    def _load_entries(
        self, ino: int, names: list[bytes], children: list[int], directories: set[int]
    ) -> None:
        """Fill a directory from a checkpoint, checking what `_set_entry` checks.

        `directories` holds the inode numbers of every directory of the tree.
        """
        entries = self.inodes[ino].entries
        if entries is None:
            raise ValueError(f"inode {ino} is not a directory")
        if len(names) != len(children):
            raise ValueError(f"the entries of directory {ino} are not (name, inode) pairs")
        if not names:
            return
        # Checked with builtins that loop in C, as the inode records are. The loop over each
        # name runs only to name the first invalid one.
        if (
            not set(map(type, names)) <= {bytes}
            or min(map(len, names)) < 1
            or max(map(len, names)) > NAME_MAX
        ):
            for name in names:
                _check_name(name)
        inodes = self.inodes
        if not all(map(inodes.__contains__, children)):
            name, child_ino = next(
                pair for pair in zip(names, children, strict=True) if pair[1] not in inodes
            )
            raise ValueError(
                f"entry {name!r} in directory {ino} points to missing inode {child_ino}"
            )
        for child_ino in directories.intersection(children):
            inodes[child_ino].parent = ino
        entries.update(zip(names, children, strict=True))

    def _load_map(self, ino: int, runs: list[int]) -> None:
        blocks = self.inodes[ino].blocks
        if blocks is None:
            raise ValueError(f"inode {ino} is not a regular file")
        before = len(blocks)
        for index in range(0, len(runs), 3):
            findex, blockno, count = runs[index : index + 3]
            if count == 1:
                blocks[findex] = blockno
            else:
                blocks.update(
                    zip(range(findex, findex + count), range(blockno, blockno + count), strict=True)
                )
        self.mapped_blocks += len(blocks) - before


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector.

    An image of a million inodes makes millions of lists, and the collector would scan them
    all again and again: pausing it more than halves encode and decode times. Neither creates
    reference cycles, so nothing is left for the collector afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_APPLY = {
    SET_INODE: Tree._set_inode,
    SET_ENTRY: Tree._set_entry,
    MAP_BLOCKS: Tree._map_blocks,
    UNMAP_FROM: Tree._unmap_from,
    SET_XATTR: Tree._set_xattr,
    DROP_INODE: Tree._drop_inode,
}


def _check_runs(runs: Any, geometry: Geometry | None) -> None:
    """Raise ValueError unless `runs` are flat (file index, block, count) triples that fit.

    The blocks must lie in the data region of `geometry`, or below MAX_DEVICE_BLOCKS without
    one, and the counts together must not exceed the region, since no block is mapped twice.
    """
    if type(runs) is not list or len(runs) % 3:
        raise ValueError("a block map is not a list of integer triples")
    if not runs:
        return
    if set(map(type, runs)) != {int}:
        raise ValueError("a block map is not a list of integer triples")
    first, end = (geometry.data_start, geometry.nblocks) if geometry else (0, MAX_DEVICE_BLOCKS)
    findexes, blocknos, counts = runs[0::3], runs[1::3], runs[2::3]
    if min(counts) < 1 or min(findexes) < 0 or min(blocknos) < first:
        raise ValueError("a block run has a count below 1 or a negative or non-data block")
    if max(map(operator.add, findexes, counts)) > MAX_FILE_BLOCKS:
        raise ValueError(f"a block run ends past file block {MAX_FILE_BLOCKS}")
    if max(map(operator.add, blocknos, counts)) > end:
        raise ValueError(f"a block run ends past block {end}, the end of the data region")
    if sum(counts) > end - first:
        raise ValueError(f"the block runs map {sum(counts)} blocks, more than {end - first}")


def _check_mapped_total(tree: Tree, geometry: Geometry | None) -> None:
    """Raise Corrupted if the tree maps more file blocks than the data region has."""
    if geometry is not None and tree.mapped_blocks > geometry.data_blocks:
        raise Corrupted(
            f"the block maps hold {tree.mapped_blocks} blocks, more than the "
            f"{geometry.data_blocks} of the data region"
        )


def _triples(flat: list[int]) -> Iterator[tuple[int, int, int]]:
    for index in range(0, len(flat), 3):
        yield flat[index], flat[index + 1], flat[index + 2]


def encode_runs(mapping: dict[int, int]) -> list[int]:
    """Return a block map as flat (file index, device block, count) triples of runs."""
    if len(mapping) == 1:
        ((findex, blockno),) = mapping.items()
        return [findex, blockno, 1]
    flat: list[int] = []
    first_index = first_block = count = -1
    for findex, blockno in sorted(mapping.items()):
        if findex == first_index + count and blockno == first_block + count:
            count += 1
            continue
        if count > 0:
            flat += (first_index, first_block, count)
        first_index, first_block, count = findex, blockno, 1
    if count > 0:
        flat += (first_index, first_block, count)
    return flat
