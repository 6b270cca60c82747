"""File data I/O of the Volume: read with readahead, write, and the block work of truncate.

Reads and writes first await what they need (cached blocks, write-back room), then look the
inode up again and re-check it before they commit, because the file may change during an await.
"""

from __future__ import annotations

from pxfs.errors import FileTooLarge, InvalidArgument, IsADirectory
from pxfs.volume.device import BLOCK_SIZE, ZERO_BLOCK
from pxfs.volume.inodes import MAP_BLOCKS, UNMAP_FROM, Change, Inode
from pxfs.volume.tree import encode_runs
from pxfs.volume.volumebase import VolumeBase, now_ns

#: The readahead window of sequential reads, in blocks: 4 MiB after the last block read.
READ_AHEAD_BLOCKS = 64
#: Blocks read along with a sequential read that misses the cache, and the least number of
#: absent blocks in the window that starts a background read.
READ_AHEAD_STEP = 16
#: Files whose last read end is remembered to detect sequential reads.
_READ_AHEAD_FILES = 1024
_RELATIME_NS = 24 * 3600 * 10**9


class FileData(VolumeBase):
    """The Volume layer that reads, writes and truncates regular files."""

    # Resizing, and the tail of the last block

    def _check_resize(self, inode: Inode, size: int) -> None:
        if inode.is_dir:
            raise IsADirectory(f"inode {inode.ino} is a directory")
        if not inode.is_reg:
            raise InvalidArgument(f"inode {inode.ino} is not a regular file")
        if size < 0:
            raise InvalidArgument(f"invalid size {size}")
        if size > self._max_file_size:
            raise FileTooLarge(f"size {size} exceeds the volume size {self._max_file_size}")

    async def _load_tail(self, ino: int, size: int) -> Inode:
        """Return the inode once the block whose tail a resize to `size` zeroes is cached."""
        while True:
            inode = self._inode(ino)
            assert inode.blocks is not None
            if size < inode.size:
                blockno = inode.blocks.get(size // BLOCK_SIZE) if size % BLOCK_SIZE else None
            else:
                blockno = self._exposed_tail(inode, size)
            if blockno is None or self._cache.has(blockno):
                return inode
            await self._cache.load([blockno])

    def _exposed_tail(self, inode: Inode, new_end: int) -> int | None:
        """Return the last block if growing the file to `new_end` brings its tail inside EOF.

        Data reaches the device before the record that grows a file, so a crash can leave bytes
        past EOF in the last block. They must read as zeros once the file grows over them.
        """
        assert inode.blocks is not None
        if new_end <= inode.size or not inode.size % BLOCK_SIZE:
            return None
        return inode.blocks.get(inode.size // BLOCK_SIZE)

    def _zero_exposed_tail(self, inode: Inode, blockno: int) -> None:
        offset = inode.size % BLOCK_SIZE
        block = self._cache.peek(blockno)
        assert block is not None
        if block.count(0, offset) != BLOCK_SIZE - offset:
            self._cache.zero_from(blockno, offset)
            # The zeros must be durable before the record that makes them part of the file.
            self._ordered = True

    def _truncate_changes(self, inode: Inode, size: int) -> list[Change]:
        """Zero the tail of the new last block and return the change that unmaps the rest."""
        assert inode.blocks is not None
        if size >= inode.size:
            return []
        if size % BLOCK_SIZE:
            blockno = inode.blocks.get(size // BLOCK_SIZE)
            if blockno is not None:
                # Bytes past EOF in the last block stay zero, so growing the file reads zeros.
                self._cache.zero_from(blockno, size % BLOCK_SIZE)
                self._ordered = True
        keep = -(-size // BLOCK_SIZE)
        if any(findex >= keep for findex in inode.blocks):
            return [[UNMAP_FROM, inode.ino, keep]]
        return []

    # File data

    def _regular(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if not inode.is_reg:
            raise InvalidArgument(f"inode {ino} is not a regular file")
        return inode

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Read up to `size` bytes at `offset`. Holes read as zeros."""
        return bytes(await self.read_buffer(ino, offset, size))

    async def read_buffer(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """Read as `read` does, but a read inside one block returns a view of the cached block.

        The view is valid only until the caller's next await, because a later write may
        change the cached block in place.
        """
        if offset < 0 or size < 0:
            raise InvalidArgument(f"invalid read of {size} bytes at {offset}")
        sequential = self._is_sequential(ino, offset)
        while True:
            inode = self._regular(ino)
            end = min(offset + size, inode.size)
            if end <= offset:
                return b""
            assert inode.blocks is not None
            first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
            mapped = [inode.blocks.get(findex) for findex in range(first, last + 1)]
            wanted = [blockno for blockno in mapped if blockno is not None]
            if any(not self._cache.has(blockno) for blockno in wanted):
                ahead = self._blocks_ahead(inode, last, READ_AHEAD_STEP) if sequential else []
                await self._cache.load(wanted + ahead)
                # The file may have changed while the blocks were read: start over.
                continue
            data = self._gather(mapped, offset - first * BLOCK_SIZE, end - offset)
            if data is None:
                continue
            if sequential:
                self._prefetch_ahead(inode, last)
            self._note_read(ino, end)
            self._touch_atime(inode)
            return data

    def _is_sequential(self, ino: int, offset: int) -> bool:
        """Tell whether a read at `offset` continues the last read of the file, or nearly."""
        previous = self._read_ends.get(ino)
        return previous is not None and 0 <= offset - previous <= READ_AHEAD_BLOCKS * BLOCK_SIZE

    def _note_read(self, ino: int, end: int) -> None:
        self._read_ends.pop(ino, None)
        self._read_ends[ino] = end
        if len(self._read_ends) > _READ_AHEAD_FILES:
            del self._read_ends[next(iter(self._read_ends))]

    def _blocks_ahead(self, inode: Inode, last: int, count: int) -> list[int]:
        """Return the mapped blocks of the `count` file blocks after `last` that are absent."""
        assert inode.blocks is not None
        limit = min(last + 1 + count, -(-inode.size // BLOCK_SIZE))
        ahead = (inode.blocks.get(findex) for findex in range(last + 1, limit))
        return self._cache.absent(blockno for blockno in ahead if blockno is not None)

    def _prefetch_ahead(self, inode: Inode, last: int) -> None:
        """Queue a background read of the readahead window once a step of it is absent.

        Waiting for a whole step makes each read call to the replicas move at least
        READ_AHEAD_STEP blocks. The end of the file starts the read of what is left.
        """
        absent = self._blocks_ahead(inode, last, READ_AHEAD_BLOCKS)
        reaches_end = (last + 1 + READ_AHEAD_BLOCKS) * BLOCK_SIZE >= inode.size
        if len(absent) >= READ_AHEAD_STEP or (absent and reaches_end):
            self._cache.prefetch(absent)

    def _gather(
        self, mapped: list[int | None], skip: int, length: int
    ) -> bytes | memoryview | None:
        if len(mapped) == 1:
            single = ZERO_BLOCK if mapped[0] is None else self._cache.peek(mapped[0])
            if single is None:
                return None
            return memoryview(single)[skip : skip + length]
        parts: list[memoryview] = []
        for blockno in mapped:
            block = ZERO_BLOCK if blockno is None else self._cache.peek(blockno)
            if block is None:
                return None
            parts.append(memoryview(block))
        # Only the requested bytes of the first and last block are copied.
        parts[0] = parts[0][skip:]
        parts[-1] = parts[-1][: skip + length - (len(parts) - 1) * BLOCK_SIZE]
        return b"".join(parts)

    def _touch_atime(self, inode: Inode) -> None:
        """Update atime the way relatime does: once after each change, else once a day."""
        now = now_ns()
        if (
            inode.atime_ns <= inode.mtime_ns
            or inode.atime_ns <= inode.ctime_ns
            or now - inode.atime_ns > _RELATIME_NS
        ):
            self._commit([inode.record(atime_ns=now)])

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """Write `data` at `offset`, allocating blocks. NoSpace leaves the file unchanged."""
        if offset < 0:
            raise InvalidArgument(f"invalid write offset {offset}")
        if not data:
            self._regular(ino)
            return 0
        end = offset + len(data)
        if end > self._max_file_size:
            raise FileTooLarge(f"a write up to {end} exceeds the volume size {self._max_file_size}")
        await self._cache.throttle()
        flushed = False
        while True:
            inode = self._regular(ino)
            assert inode.blocks is not None
            first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
            needed = self._partial_blocks(inode, offset, end)
            exposed = self._exposed_tail(inode, offset)
            if exposed is not None and not self._cache.has(exposed):
                needed.append(exposed)
            if needed:
                await self._cache.load(needed)
                continue
            fresh = [f for f in range(first, last + 1) if f not in inode.blocks]
            if len(fresh) > self._alloc.free_blocks and self._alloc.pending_blocks and not flushed:
                # Freed blocks become usable once the records that freed them are durable.
                await self._flush()
                flushed = True
                continue
            if exposed is not None:
                self._zero_exposed_tail(inode, exposed)
            self._write_now(inode, offset, memoryview(data), fresh)
            return len(data)

    def _partial_blocks(self, inode: Inode, offset: int, end: int) -> list[int]:
        """Return the mapped, uncached blocks that the write covers only in part."""
        assert inode.blocks is not None
        needed = []
        for findex in {offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE}:
            start = findex * BLOCK_SIZE
            if offset <= start and end >= start + BLOCK_SIZE:
                continue
            blockno = inode.blocks.get(findex)
            if blockno is not None and not self._cache.has(blockno):
                needed.append(blockno)
        return needed

    def _write_now(self, inode: Inode, offset: int, data: memoryview, fresh: list[int]) -> None:
        """Allocate, copy the data into the cache and commit, in one step."""
        assert inode.blocks is not None
        allocated = dict(zip(fresh, self._alloc.allocate(len(fresh)), strict=True))
        end = offset + len(data)
        for findex in range(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            start = findex * BLOCK_SIZE
            low, high = max(offset, start), min(end, start + BLOCK_SIZE)
            chunk = data[low - offset : high - offset]
            blockno = allocated.get(findex)
            if blockno is None:
                blockno = inode.blocks[findex]
            elif high - low < BLOCK_SIZE:
                self._cache.put_zero(blockno)
            if high - low == BLOCK_SIZE:
                self._cache.put(blockno, chunk)
            else:
                self._cache.patch(blockno, low - start, chunk)
        now = now_ns()
        changes: list[Change] = []
        if allocated:
            changes.append([MAP_BLOCKS, inode.ino, encode_runs(allocated)])
            self._ordered = True
        changes.append(inode.record(size=max(inode.size, end), mtime_ns=now, ctime_ns=now))
        self._commit(changes)
