"""Offline consistency check of a volume (pxctl volume check).

The check loads the metadata the way open does, without writing anything, and then verifies
the tree. Every inode must be reachable from the root, link counts must equal the directory
references and `..` must name the parent. Every block must lie inside the data region, in one
map only and not past EOF, and must be readable. Inodes with no links and no entries are orphans
of a crash, which the next open drops, so they are not problems. Nor are bytes past EOF in a
last block: a crash can leave data whose growing record was lost, and the Volume zeroes such
bytes before the file grows over them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

from pxfs.errors import ChecksumMismatch, Corrupted, NotFound
from pxfs.volume.device import BLOCK_SIZE, BlockDevice
from pxfs.volume.format import NAME_MAX, ROOT_INO, Geometry
from pxfs.volume.inodes import Inode
from pxfs.volume.journal import newest_checkpoint, read_superblock, replay_journal
from pxfs.volume.tree import Tree

log = logging.getLogger(__name__)

#: Blocks per device call while reading every mapped block.
_READ_CHUNK = 64


async def check_volume(device: BlockDevice) -> list[str]:
    """Return the problems found on the volume; an empty list means it is consistent."""
    try:
        sb = await read_superblock(device)
        checkpoint = await newest_checkpoint(device, sb)
        tree = Tree.decode(checkpoint.image)
        replay = await replay_journal(device, sb, checkpoint.anchor)
    except (NotFound, Corrupted, ChecksumMismatch) as exc:
        return [exc.message]
    problems: list[str] = []
    for seq, changes in replay.records:
        try:
            for change in changes:
                tree.apply(change)
        except Corrupted as exc:
            problems.append(f"journal record {seq} does not apply: {exc.message}")
            break
    if ROOT_INO not in tree.inodes or not tree.inodes[ROOT_INO].is_dir:
        return [*problems, "the root directory is missing"]
    problems += _check_tree(tree)
    owners = _check_maps(tree, sb.geometry, problems)
    problems += await _check_blocks(device, owners)
    log.info("check of volume %s found %d problems", sb.uuid, len(problems))
    return problems


def _check_tree(tree: Tree) -> list[str]:
    """Check reachability, entries, link counts and `..`."""
    problems: list[str] = []
    references = {ino: 0 for ino in tree.inodes}
    subdirs = {ino: 0 for ino in tree.inodes}
    reached = {ROOT_INO}
    pending = deque([ROOT_INO])
    while pending:
        directory = tree.inodes[pending.popleft()]
        for name, child_ino in (directory.entries or {}).items():
            problems += _check_entry(tree, directory, name, child_ino)
            child = tree.inodes.get(child_ino)
            if child is None:
                continue
            references[child_ino] += 1
            if child.is_dir:
                subdirs[directory.ino] += 1
                if child.parent != directory.ino:
                    problems.append(
                        f"directory {child_ino} is in directory {directory.ino} but its '..' is "
                        f"{child.parent}"
                    )
            if child_ino not in reached:
                reached.add(child_ino)
                if child.is_dir:
                    pending.append(child_ino)
    for inode in tree.inodes.values():
        problems += _check_links(inode, references[inode.ino], subdirs[inode.ino], reached)
    return problems


def _check_entry(tree: Tree, directory: Inode, name: bytes, child_ino: int) -> list[str]:
    problems = []
    if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name:
        problems.append(f"directory {directory.ino} has an invalid name {name!r}")
    if child_ino not in tree.inodes:
        problems.append(
            f"entry {name!r} in directory {directory.ino} points to missing inode {child_ino}"
        )
    elif child_ino == ROOT_INO:
        problems.append(f"entry {name!r} in directory {directory.ino} points to the root")
    return problems


def _check_links(inode: Inode, references: int, subdirs: int, reached: set[int]) -> list[str]:
    if inode.ino not in reached:
        if inode.nlink == 0:
            return []
        return [f"inode {inode.ino} has {inode.nlink} links but is not reachable from the root"]
    if inode.is_dir:
        problems = []
        if inode.ino != ROOT_INO and references != 1:
            problems.append(f"directory {inode.ino} has {references} entries pointing to it")
        if inode.nlink != 2 + subdirs:
            problems.append(
                f"directory {inode.ino} has nlink {inode.nlink}, expected {2 + subdirs}"
            )
        return problems
    if inode.nlink != references:
        return [f"inode {inode.ino} has nlink {inode.nlink} but {references} directory entries"]
    return []


def _check_maps(tree: Tree, geometry: Geometry, problems: list[str]) -> dict[int, tuple[int, int]]:
    """Check block maps; return device block -> (inode, file block index) for the valid ones."""
    owners: dict[int, tuple[int, int]] = {}
    for inode in tree.inodes.values():
        for findex, blockno in sorted((inode.blocks or {}).items()):
            if not geometry.is_data(blockno):
                problems.append(f"inode {inode.ino} maps block {blockno} outside the data region")
                continue
            if blockno in owners:
                problems.append(
                    f"block {blockno} is mapped by inode {owners[blockno][0]} and inode {inode.ino}"
                )
                continue
            if findex * BLOCK_SIZE >= inode.size:
                problems.append(
                    f"inode {inode.ino} maps block {blockno} at offset {findex * BLOCK_SIZE}, "
                    f"past its size {inode.size}"
                )
            owners[blockno] = (inode.ino, findex)
    return owners


async def _check_blocks(device: BlockDevice, owners: dict[int, tuple[int, int]]) -> list[str]:
    """Read every mapped block, in chunks; report the blocks that fail their checksum."""
    problems: list[str] = []
    for chunk in _chunks(sorted(owners), _READ_CHUNK):
        try:
            await device.read_blocks(chunk)
        except ChecksumMismatch:
            for blockno in chunk:
                await _read_one(device, blockno, owners, problems)
    return problems


async def _read_one(
    device: BlockDevice, blockno: int, owners: dict[int, tuple[int, int]], problems: list[str]
) -> None:
    try:
        await device.read_blocks([blockno])
    except ChecksumMismatch as exc:
        ino, findex = owners[blockno]
        problems.append(
            f"block {blockno} (inode {ino}, offset {findex * BLOCK_SIZE}) is unreadable: "
            f"{exc.message}"
        )


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
