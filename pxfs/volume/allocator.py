"""The allocator of the data region: a free-block bitmap and the freed blocks not yet reusable.

A freed block becomes reusable once the journal record that freed it is durable.
"""

from __future__ import annotations

from collections import deque

from pxfs.errors import Corrupted, InvalidArgument, NoSpace
from pxfs.volume.format import Geometry
from pxfs.volume.tree import Tree


class Allocator:
    """The free-block bitmap of the data region, derived from the block maps at open.

    A freed block waits on a pending list, tagged with the sequence number of the journal record
    that freed it, until that record is durable. Only then may it be trimmed and reused.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.start = geometry.data_start
        self._used = bytearray(geometry.data_blocks)
        self._free = geometry.data_blocks
        self._pending: deque[tuple[int, list[int]]] = deque()
        self._pending_count = 0
        self._hint = 0

    @classmethod
    def from_tree(cls, geometry: Geometry, tree: Tree) -> Allocator:
        """Build the bitmap from the block maps; raises Corrupted on a bad or shared block."""
        allocator = cls(geometry)
        for inode in tree.inodes.values():
            for blockno in (inode.blocks or {}).values():
                allocator._claim(inode.ino, blockno, geometry)
        return allocator

    def _claim(self, ino: int, blockno: int, geometry: Geometry) -> None:
        if not geometry.is_data(blockno):
            raise Corrupted(f"inode {ino} maps block {blockno} outside the data region")
        index = blockno - self.start
        if self._used[index]:
            raise Corrupted(f"block {blockno} is mapped twice (once by inode {ino})")
        self._used[index] = 1
        self._free -= 1

    @property
    def free_blocks(self) -> int:
        """Blocks that can be allocated now."""
        return self._free

    @property
    def pending_blocks(self) -> int:
        """Freed blocks waiting for their record to become durable."""
        return self._pending_count

    def allocate(self, count: int) -> list[int]:
        """Allocate `count` blocks, consecutive where possible; raises NoSpace, taking none."""
        if count > self._free:
            raise NoSpace(f"the volume has {self._free} free blocks, {count} needed")
        found: list[int] = []
        index = self._hint
        while len(found) < count:
            index = self._used.find(0, index)
            if index < 0:
                index = self._used.find(0)
            self._used[index] = 1
            found.append(self.start + index)
            index += 1
        self._free -= count
        self._hint = index if index < len(self._used) else 0
        return found

    def grow(self, geometry: Geometry) -> None:
        """Add the blocks that a larger data region of `geometry` brings, all free."""
        if geometry.data_start != self.start or geometry.data_blocks < len(self._used):
            raise InvalidArgument("the allocator grows only at the end of its data region")
        added = geometry.data_blocks - len(self._used)
        self._used += bytes(added)
        self._free += added

    def release_later(self, blocks: list[int], seq: int) -> None:
        """Queue blocks freed by journal record `seq`."""
        if blocks:
            self._pending.append((seq, blocks))
            self._pending_count += len(blocks)

    def take_releasable(self, durable_seq: int) -> list[int]:
        """Pop the pending blocks whose freeing record is durable, for trim and `mark_free`.

        They still count as pending until `mark_free`, so that a writer short of space while
        they are trimmed knows that space is coming.
        """
        ready: list[int] = []
        while self._pending and self._pending[0][0] <= durable_seq:
            ready += self._pending.popleft()[1]
        return ready

    def mark_free(self, blocks: list[int]) -> None:
        """Return blocks taken by `take_releasable` to the bitmap."""
        for blockno in blocks:
            self._used[blockno - self.start] = 0
        self._free += len(blocks)
        self._pending_count -= len(blocks)
