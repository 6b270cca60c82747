"""Resync, reconcile and read repair: copy blocks between the replicas of a volume.

Every block of a replica carries the version of the write or trim that last changed it
(docs/store-format.md). Two replicas contain the same content for a block exactly when their
versions match, so a table scan of both finds the blocks that one of them missed. The scan first
compares a digest of the versions of each region of DIGEST_BLOCKS blocks (`store.digests`) and
reads the versions of the regions whose digests differ only, so what it moves grows with the
blocks missed rather than with the volume. A resync's target pulls the blocks from the source's
node (`store.pull`) when its store can, and otherwise this client reads them and sends them on
with `store.copy`. Either way a block is stored only while the target still has the version that
the scan read, so a write that reaches the target after the scan wins over the copy.

The rules for which copy is authoritative are in docs/replication.md.
"""

from __future__ import annotations

import array
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from pxfs.errors import (
    ChecksumMismatch,
    InvalidArgument,
    NotSupported,
    ProtocolError,
    PxfsError,
    StaleEpoch,
    Unavailable,
)
from pxfs.store import DIGEST_BLOCKS, DIGEST_SIZE
from pxfs.storeargs import MAX_DIGESTS_PER_CALL, Entry, check_entries

log = logging.getLogger(__name__)

#: Blocks per version scan call: 65536 versions are a 512 KiB reply and cover 4 GiB of volume.
SCAN_BLOCKS = 65536
#: Blocks per digests call: 16384 digests are a 256 KiB reply and cover 1 TiB of volume.
DIGEST_SCAN_BLOCKS = MAX_DIGESTS_PER_CALL * DIGEST_BLOCKS
#: Blocks per copy call: 4 MiB of data, the size of the replication client's write frames.
COPY_BLOCKS = 64
#: Copy calls in flight at once, so that reading from the source overlaps writing the target.
COPY_IN_FLIGHT = 4


class Peer(Protocol):
    """The interface of a replica that the functions of this module call."""

    @property
    def id(self) -> str:
        """The replica's id: the id of its node, which `store.pull` names as the source."""
        ...

    @property
    def name(self) -> str:
        """The replica's id and address, for messages."""
        ...

    async def call(self, method: str, *args: Any) -> Any:
        """Call a `store.*` method of the replica. Raises PxfsError on failure or timeout."""
        ...


@dataclass
class ResyncProgress:
    """The progress of the resync of one replica, in blocks."""

    target: str
    total: int
    scanned: int = 0
    #: Blocks that the scans so far found to differ.
    planned: int = 0
    #: Blocks of `planned` stored on the target so far.
    copied: int = 0
    full: bool = False
    aborted: str = ""


@dataclass
class PullState:
    """Whether the batches of one resync still go as `store.pull`, straight between the nodes.

    A pull moves each block once, from the source's node to the target's, where the copy
    through this client moves it twice. The first pull that fails turns pulls off for the rest
    of the resync, and the batches go through this client.
    """

    enabled: bool = True
    #: Set once a pull has succeeded. Until then one pull runs at a time, so that a target
    #: that cannot pull fails one batch rather than every batch in flight.
    proven: bool = False
    probe: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class BadCopy:
    """A copy of a block that failed its checksum, with its replica, index and claimed version."""

    peer: Peer
    index: int
    version: int


async def fetch_versions(peer: Peer, vol_id: str, first: int, count: int) -> array.array[int]:
    """Return the versions of blocks [first, first + count) of `peer`."""
    raw = await peer.call("store.versions", vol_id, first, count)
    if not isinstance(raw, bytes) or len(raw) != 8 * count:
        raise ProtocolError(f"replica {peer.name} sent a malformed versions reply")
    versions = array.array("Q")
    versions.frombytes(raw)
    if sys.byteorder == "big":
        versions.byteswap()
    return versions


async def fetch_digests(peer: Peer, vol_id: str, first: int, count: int) -> list[bytes] | None:
    """Return the region digests of blocks [first, first + count) of `peer`, one per region.

    Returns None when the replica's store predates `store.digests`.
    """
    try:
        raw = await peer.call("store.digests", vol_id, first, count)
    except NotSupported:
        return None
    regions = -(-count // DIGEST_BLOCKS)
    if not isinstance(raw, bytes) or len(raw) != DIGEST_SIZE * regions:
        raise ProtocolError(f"replica {peer.name} sent a malformed digests reply")
    return [raw[offset : offset + DIGEST_SIZE] for offset in range(0, len(raw), DIGEST_SIZE)]


async def differing_ranges(
    vol_id: str, peers: Sequence[Peer], first: int, count: int, nblocks: int
) -> list[tuple[int, int]]:
    """Return the (first, count) ranges of [first, first + count) where `peers` may differ.

    Regions whose digests agree on every peer are left out, and the rest come back as runs of
    at most SCAN_BLOCKS blocks, whose versions the caller compares. A range that does not start
    at a region boundary, or does not end at one or at `nblocks`, comes back whole, and so does
    every range when a peer's store has no digests.
    """
    end = first + count
    aligned = first % DIGEST_BLOCKS == 0 and (end % DIGEST_BLOCKS == 0 or end == nblocks)
    if not aligned or count < DIGEST_BLOCKS:
        return _split([(first, count)])
    ranges: list[tuple[int, int]] = []
    for start in range(first, end, DIGEST_SCAN_BLOCKS):
        length = min(DIGEST_SCAN_BLOCKS, end - start)
        columns = [await fetch_digests(peer, vol_id, start, length) for peer in peers]
        if any(column is None for column in columns):
            ranges.append((start, length))
            continue
        for index, row in enumerate(zip(*columns, strict=True)):
            if all(digest == row[0] for digest in row[1:]):
                continue
            region = start + index * DIGEST_BLOCKS
            stop = min(region + DIGEST_BLOCKS, end)
            if ranges and ranges[-1][0] + ranges[-1][1] == region:
                ranges[-1] = (ranges[-1][0], stop - ranges[-1][0])
            else:
                ranges.append((region, stop - region))
    return _split(ranges)


async def read_versioned(peer: Peer, vol_id: str, blocknos: Sequence[int]) -> list[Entry]:
    """Read blocks from `peer` as (version, data) entries, checking the reply's shape."""
    reply = await peer.call("store.read_versioned", vol_id, list(blocknos))
    return check_entries(reply, len(blocknos), peer.name)


async def read_good(
    vol_id: str, peers: Sequence[Peer], blocknos: Sequence[int]
) -> tuple[list[Entry], list[BadCopy]]:
    """Read each block from the first peer that has a good copy, in the order of `peers`.

    Returns the entries and the copies that failed their checksum on the way. Raises
    ChecksumMismatch when some block has no good copy on any peer, and Unavailable when no peer
    could be read for it.
    """
    found: list[Entry | None] = [None] * len(blocknos)
    pending = list(range(len(blocknos)))
    bad: list[BadCopy] = []
    failures: list[str] = []
    for peer in peers:
        if not pending:
            break
        try:
            entries = await read_versioned(peer, vol_id, [blocknos[i] for i in pending])
        except InvalidArgument:
            raise
        except PxfsError as exc:
            log.warning(
                "volume %s: read from replica %s failed: %s", vol_id, peer.name, exc.message
            )
            failures.append(f"{peer.name}: {exc.message}")
            continue
        still = []
        for index, (version, data) in zip(pending, entries, strict=True):
            if data is False:
                bad.append(BadCopy(peer, index, version))
                still.append(index)
            else:
                found[index] = (version, data)
        pending = still
    if pending:
        raise _read_error(vol_id, [blocknos[i] for i in pending], bad, failures, peers)
    return [entry for entry in found if entry is not None], bad


def _read_error(
    vol_id: str,
    blocknos: list[int],
    bad: list[BadCopy],
    failures: list[str],
    peers: Sequence[Peer],
) -> PxfsError:
    if not peers:
        return Unavailable(f"volume {vol_id}: no in-sync replica is left to read from")
    first_blocks = ", ".join(str(blockno) for blockno in blocknos[:8])
    if bad:
        detail = "; ".join(failures + [f"{copy.peer.name}: bad checksum" for copy in bad])
        return ChecksumMismatch(
            f"volume {vol_id}: no good copy left of blocks {first_blocks} ({detail})"
        )
    return Unavailable(
        f"volume {vol_id}: no replica could serve the read of blocks {first_blocks} "
        f"({'; '.join(failures)})"
    )


async def repair(
    vol_id: str, epoch: int, blocknos: Sequence[int], entries: list[Entry], bad: list[BadCopy]
) -> int:
    """Rewrite each bad copy with the good data of the same version; return the blocks fixed.

    A bad copy whose version differs from the good one is left alone, because a write is then in
    flight and replaces the bad copy itself.
    """
    repaired = 0
    for copy in bad:
        version, data = entries[copy.index]
        blockno = blocknos[copy.index]
        if version != copy.version or not isinstance(data, bytes):
            continue
        try:
            stored = await copy.peer.call(
                "store.copy", vol_id, epoch, [[blockno, version, version, data]]
            )
        except PxfsError as exc:
            log.warning(
                "volume %s: repair of block %d on replica %s failed: %s",
                vol_id,
                blockno,
                copy.peer.name,
                exc.message,
            )
            continue
        if stored:
            repaired += 1
            log.warning(
                "volume %s: repaired block %d (version %x) on replica %s from a good copy",
                vol_id,
                blockno,
                version,
                copy.peer.name,
            )
    return repaired


async def resync(
    vol_id: str,
    epoch: int,
    nblocks: int,
    sources: Callable[[], Sequence[Peer]],
    target: Peer,
    floor: int,
    progress: ResyncProgress,
) -> None:
    """Copy to `target` every block whose version differs from the first source's.

    `sources` returns the replicas of the write set at the time of the call, so that a replica
    that leaves the write set during the resync stops being a source.

    `floor` is the lowest version of the writes that the client also sends to `target`. A
    target block at `floor` or above came from such a write, so it is current and is not copied.
    """
    current = _current_sources(vol_id, sources)
    ranges = await differing_ranges(vol_id, [current[0], target], 0, nblocks, nblocks)
    pull = PullState()
    # The regions whose digests agree hold nothing to copy: writes from the floor on reach
    # both replicas, and the client waited for the writes before the floor.
    progress.scanned = nblocks - sum(count for _, count in ranges)
    # The ranges are compared in groups of at most SCAN_BLOCKS blocks, and each group's plan is
    # copied before the next group is compared, which bounds the plan held in memory.
    for group in _groups(ranges, SCAN_BLOCKS):
        if progress.aborted:
            raise Unavailable(
                f"volume {vol_id}: resync of {target.name} stopped: {progress.aborted}"
            )
        current = _current_sources(vol_id, sources)
        plan: list[tuple[int, int]] = []
        for first, count in group:
            source_versions = await fetch_versions(current[0], vol_id, first, count)
            target_versions = await fetch_versions(target, vol_id, first, count)
            plan += _differing(first, source_versions, target_versions, floor)
        progress.planned += len(plan)
        await copy_blocks(vol_id, epoch, sources, target, plan, progress, pull)
        progress.scanned += sum(count for _, count in group)


def _groups(ranges: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """Split ranges of at most `limit` blocks into groups of at most `limit` blocks in all."""
    groups: list[list[tuple[int, int]]] = []
    total = limit
    for first, count in ranges:
        if total + count > limit:
            groups.append([])
            total = 0
        groups[-1].append((first, count))
        total += count
    return groups


def _current_sources(vol_id: str, sources: Callable[[], Sequence[Peer]]) -> Sequence[Peer]:
    current = sources()
    if not current:
        raise Unavailable(f"volume {vol_id}: no replica of the write set is left to copy from")
    return current


def _differing(
    first: int, source: array.array[int], target: array.array[int], floor: int
) -> list[tuple[int, int]]:
    """Return (blockno, target version) of each block that the target must get from the source."""
    if source == target:
        return []
    return [
        (first + index, theirs)
        for index, (ours, theirs) in enumerate(zip(source, target, strict=True))
        if ours != theirs and theirs < floor
    ]


async def copy_blocks(
    vol_id: str,
    epoch: int,
    sources: Callable[[], Sequence[Peer]],
    target: Peer,
    plan: Sequence[tuple[int, int]],
    progress: ResyncProgress | None = None,
    pull: PullState | None = None,
) -> int:
    """Copy the (blockno, expected version) blocks of `plan` to `target`; return those stored.

    Each batch reads from the replicas that `sources` returns when the batch starts, and adds
    the blocks it stored to `progress.copied` as it finishes. With `pull`, the target pulls
    each batch from the first source while `pull.enabled` holds.
    """
    stored = 0
    limiter = trio.CapacityLimiter(COPY_IN_FLIGHT)
    failures: list[PxfsError] = []

    async def copy_batch(batch: Sequence[tuple[int, int]]) -> None:
        nonlocal stored
        async with limiter:
            if failures:
                return
            try:
                count = await _copy_batch(vol_id, epoch, sources(), target, batch, pull)
            except PxfsError as exc:
                # Raised after the nursery exits, because raising inside it would wrap the error
                # in an ExceptionGroup.
                failures.append(exc)
                return
            # Added after the await, so that batches finishing together do not lose counts.
            stored += count
            if progress is not None:
                progress.copied += count

    async with trio.open_nursery() as nursery:
        for start in range(0, len(plan), COPY_BLOCKS):
            nursery.start_soon(copy_batch, plan[start : start + COPY_BLOCKS])
    if failures:
        raise failures[0]
    return stored


async def _copy_batch(
    vol_id: str,
    epoch: int,
    sources: Sequence[Peer],
    target: Peer,
    batch: Sequence[tuple[int, int]],
    pull: PullState | None,
) -> int:
    if pull is not None and sources:
        stored = await _try_pull(vol_id, epoch, sources, target, batch, pull)
        if stored is not None:
            return stored
    return await _relay_batch(vol_id, epoch, sources, target, batch)


async def _try_pull(
    vol_id: str,
    epoch: int,
    sources: Sequence[Peer],
    target: Peer,
    batch: Sequence[tuple[int, int]],
    pull: PullState,
) -> int | None:
    """Have `target` pull a batch; return the blocks stored, or None when pulls are off."""
    if not pull.proven:
        async with pull.probe:
            if pull.enabled and not pull.proven:
                stored = await _pull_or_stop(vol_id, epoch, sources, target, batch, pull)
                pull.proven = stored is not None
                return stored
    if not pull.enabled:
        return None
    return await _pull_or_stop(vol_id, epoch, sources, target, batch, pull)


async def _pull_or_stop(
    vol_id: str,
    epoch: int,
    sources: Sequence[Peer],
    target: Peer,
    batch: Sequence[tuple[int, int]],
    pull: PullState,
) -> int | None:
    try:
        return await _pull_batch(vol_id, epoch, sources, target, batch)
    except (StaleEpoch, InvalidArgument):
        raise
    except PxfsError as exc:
        # A store from before store.pull answers NotSupported. A target that reaches this
        # client but not the source's node fails otherwise. A target that is gone fails the
        # copy through this client as well, which then ends the resync.
        if pull.enabled:
            log.log(
                logging.INFO if isinstance(exc, NotSupported) else logging.WARNING,
                "volume %s: %s cannot pull from %s, so blocks go through this client: %s",
                vol_id,
                target.name,
                sources[0].name,
                exc.message,
            )
        pull.enabled = False
        return None


async def _pull_batch(
    vol_id: str, epoch: int, sources: Sequence[Peer], target: Peer, batch: Sequence[tuple[int, int]]
) -> int:
    """Have `target` pull a batch from the first source; return the blocks stored."""
    entries = [[blockno, expected] for blockno, expected in batch]
    reply = await target.call("store.pull", vol_id, epoch, sources[0].id, entries)
    stored, bad = _check_pull_reply(reply, len(batch), target.name)
    if bad:
        # The source's copies of these blocks fail their checksum. read_good reads each of
        # them from the next replica that has a good copy, or raises ChecksumMismatch.
        stored += await _relay_batch(vol_id, epoch, sources, target, [batch[i] for i in bad])
    return stored


def _check_pull_reply(reply: Any, count: int, target: str) -> tuple[int, list[int]]:
    if not isinstance(reply, dict):
        raise ProtocolError(f"replica {target} sent a malformed pull reply")
    stored, bad = reply.get("stored"), reply.get("bad")
    if isinstance(stored, bool) or not isinstance(stored, int) or not isinstance(bad, list):
        raise ProtocolError(f"replica {target} sent a malformed pull reply")
    if not all(type(index) is int and 0 <= index < count for index in bad):
        raise ProtocolError(f"replica {target} sent a malformed pull reply")
    return stored, bad


async def _relay_batch(
    vol_id: str,
    epoch: int,
    sources: Sequence[Peer],
    target: Peer,
    batch: Sequence[tuple[int, int]],
) -> int:
    """Read a batch from the sources and send it to `target`; return the blocks stored."""
    blocknos = [blockno for blockno, _ in batch]
    entries, _ = await read_good(vol_id, sources, blocknos)
    copies = [
        [blockno, expected, version, data]
        for (blockno, expected), (version, data) in zip(batch, entries, strict=True)
    ]
    count = await target.call("store.copy", vol_id, epoch, copies)
    if isinstance(count, bool) or not isinstance(count, int):
        raise ProtocolError(f"replica {target.name} sent a malformed copy reply")
    return count


async def reconcile(
    vol_id: str,
    epoch: int,
    members: Sequence[Peer],
    ranges: Sequence[tuple[int, int]],
    nblocks: int,
) -> int:
    """Make `members` agree on the blocks of the (first, count) ranges; return the blocks copied.

    Where the members' versions of a block differ, the lowest version wins and is copied over
    the others, because a higher version comes from a write that was never acknowledged. The
    caller makes sure no write is in flight. `nblocks` is the size of the replicas, where the
    last region of digests ends.
    """
    copied = 0
    pieces: list[tuple[int, int]] = []
    for first, count in ranges:
        pieces += await differing_ranges(vol_id, members, first, count, nblocks)
    for first, count in pieces:
        versions = [await fetch_versions(member, vol_id, first, count) for member in members]
        for holders, plans in _disagreements(first, members, versions).items():
            for target, plan in plans.items():
                copied += await copy_blocks(vol_id, epoch, _fixed(holders), target, plan)
    if copied:
        log.warning(
            "volume %s: reconciled %d blocks that a write below the write quorum left behind",
            vol_id,
            copied,
        )
    return copied


def _fixed(peers: Sequence[Peer]) -> Callable[[], Sequence[Peer]]:
    return lambda: peers


def _split(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces = []
    for first, count in ranges:
        for start in range(first, first + count, SCAN_BLOCKS):
            pieces.append((start, min(SCAN_BLOCKS, first + count - start)))
    return pieces


def _disagreements(
    first: int, members: Sequence[Peer], versions: list[array.array[int]]
) -> dict[tuple[Peer, ...], dict[Peer, list[tuple[int, int]]]]:
    """Group the blocks to copy by the members that hold the winning version, then by target."""
    groups: dict[tuple[Peer, ...], dict[Peer, list[tuple[int, int]]]] = {}
    if all(column == versions[0] for column in versions[1:]):
        return groups
    for index, row in enumerate(zip(*versions, strict=True)):
        lowest = min(row)
        if lowest == max(row):
            continue
        holders = tuple(
            member for member, version in zip(members, row, strict=True) if version == lowest
        )
        plans = groups.setdefault(holders, {})
        for member, version in zip(members, row, strict=True):
            if version != lowest:
                plans.setdefault(member, []).append((first + index, version))
    return groups
