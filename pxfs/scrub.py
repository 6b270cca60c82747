"""Verify and scrub: compare the replicas of a volume block by block, and repair bad copies.

`verify` reads the block table of every replica with `store.checksums` and reports the blocks
whose version or crc32 differ between replicas. With `check_data` each store also reads its data
and marks a block whose data fails its crc32.

`scrub` reads every written block of every replica, which the store checks against its crc32,
and rewrites each bad copy with the data of a good copy of the same version on a replica of the
write set. Replicas that have the same version of a block contain the same content
(docs/store-format.md), so the repair never changes what the volume contains. It goes through
`store.copy` with the bad copy's version as the expected version. A write from the mount child
that reaches the block first changes that version, so the older data is dropped and a mounted
volume can be scrubbed without stopping its writes. A block with no good copy at its version is
reported as lost and left as it is.

A Scrubber runs both for pxd's control methods. It also scrubs each volume whose first online
replica node is this node once per `scrub_interval_seconds` at `scrub_rate_mib` MiB/s, and keeps
the totals in the volume's catalog record under "scrub".
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from pxfs.catalog import Catalog, VolumeRecord
from pxfs.errors import Busy, InvalidArgument, PxfsError, StaleEpoch, Unavailable
from pxfs.membership import Peers
from pxfs.rpc import RpcClient
from pxfs.store import BLOCK_SIZE, DATA_BAD, TRIMMED
from pxfs.storeargs import MAX_CHECKED_PER_CALL

log = logging.getLogger(__name__)

#: Seconds that connecting to a replica, or one checksums, read or copy call on it, may take.
REPLICA_TIMEOUT = 60.0
#: Maximum number of differing, repaired or lost blocks listed in a result. The counts cover
#: all of them.
LISTED_BLOCKS = 20
#: Seconds that verify waits before it reads a range with differences again. A write of a mounted
#: volume reaches its replicas within milliseconds of each other, so a block that still differs
#: after this pause is not a write in flight.
RECHECK_DELAY = 0.5
#: Blocks per store.checksums call of a verify that reads only the tables. A range whose
#: tables differ is decoded record by record in pxd's event loop, and 65536 records of three
#: replicas keep one such step short.
VERIFY_TABLE_BLOCKS = 65536
#: Maximum seconds between two checks for volumes due for the periodic scrub. A shorter scrub
#: interval checks more often.
PERIODIC_POLL = 60.0
#: Maximum seconds from a failed periodic scrub of a volume to its next try. A shorter scrub
#: interval retries sooner.
RETRY_AFTER_FAILURE = 3600.0

_RECORD = struct.Struct("<QII")

UNWRITTEN = "unwritten"
WRITTEN = "written"
BAD = "bad"


@dataclass(frozen=True)
class BlockCopy:
    """One replica's table record of one block, as `store.checksums` returns it."""

    version: int
    crc: int
    state: str  # UNWRITTEN, WRITTEN or BAD

    def content_key(self) -> tuple[int, int] | None:
        """Return the key on which equal copies agree: None if unwritten, else (version, crc)."""
        if self.state == UNWRITTEN:
            return None
        return self.version, self.crc

    def describe(self) -> str:
        """Describe the copy in one phrase for a report."""
        if self.state == UNWRITTEN:
            return "unwritten"
        text = f"version {self.version:x} crc32 {self.crc:08x}"
        return text + ", data fails its checksum" if self.state == BAD else text


def decode_checksums(raw: bytes) -> list[BlockCopy]:
    """Decode a `store.checksums` reply into one BlockCopy per block."""
    if not isinstance(raw, bytes) or len(raw) % _RECORD.size:
        raise InvalidArgument("a store.checksums reply is not a whole number of 16-byte records")
    copies = []
    for version, crc, flags in _RECORD.iter_unpack(raw):
        if version == 0 or flags & TRIMMED:
            copies.append(BlockCopy(version, 0, UNWRITTEN))
        elif flags & DATA_BAD:
            copies.append(BlockCopy(version, crc, BAD))
        else:
            copies.append(BlockCopy(version, crc, WRITTEN))
    return copies


def written_count(raw: bytes) -> int:
    """Count the written blocks of a `store.checksums` reply without decoding each record."""
    words = array.array("Q")
    words.frombytes(raw)
    if sys.byteorder == "big":
        words.byteswap()
    # A record is two u64 words: the version, then crc32 and flags. A trimmed record has a
    # non-zero version, crc32 0 and flags equal to TRIMMED, so no record is counted twice.
    unwritten = words[0::2].count(0) + words[1::2].count(TRIMMED << 32)
    return len(raw) // _RECORD.size - unwritten


def differing_blocks(first: int, copies: dict[str, list[BlockCopy]]) -> list[int]:
    """Return the blocks from `first` whose copies differ or have bad data on some replica."""
    columns = list(copies.values())
    found = []
    for index, row in enumerate(zip(*columns, strict=True)):
        keys = {copy.content_key() for copy in row}
        if len(keys) > 1 or any(copy.state == BAD for copy in row):
            found.append(first + index)
    return found


def allocated_count(copies: dict[str, list[BlockCopy]]) -> int:
    """Count the blocks that are written on at least one replica."""
    columns = list(copies.values())
    return sum(
        1 for row in zip(*columns, strict=True) if any(copy.state != UNWRITTEN for copy in row)
    )


@dataclass(frozen=True)
class RepairPlan:
    """The scrub decision for one bad copy: repair it from `source`, skip it, or report it lost."""

    blockno: int
    target: str
    version: int
    source: str | None  # None when there is no copy to repair from
    outcome: str  # "repair", "skip" (good copies are at another version) or "lost"


def plan_repairs(
    first: int, copies: dict[str, list[BlockCopy]], write_set: Sequence[str]
) -> list[RepairPlan]:
    """Plan a repair for each bad copy in a range of blocks starting at `first`.

    The source is a replica of the write set whose copy is good and has the bad copy's version.
    Without one, a good copy at another version means that the bad replica missed a write,
    which a resync or the next write fixes ("skip"), and no good copy means the block is lost.
    """
    plans = []
    nodes = list(copies)
    for index, row in enumerate(zip(*copies.values(), strict=True)):
        for node, copy in zip(nodes, row, strict=True):
            if copy.state != BAD:
                continue
            good = [
                (other, other_copy)
                for other, other_copy in zip(nodes, row, strict=True)
                if other != node and other in write_set and other_copy.state == WRITTEN
            ]
            same = [other for other, other_copy in good if other_copy.version == copy.version]
            blockno = first + index
            if same:
                plans.append(RepairPlan(blockno, node, copy.version, same[0], "repair"))
            elif good:
                plans.append(RepairPlan(blockno, node, copy.version, None, "skip"))
            else:
                plans.append(RepairPlan(blockno, node, copy.version, None, "lost"))
    return plans


def is_due(
    record: VolumeRecord, node_id: str, online: set[str], interval: float, now_ns: int
) -> bool:
    """Return whether the node `node_id` should scrub `record` now, `interval` s after the last.

    One node scrubs each volume, the first replica node that is in `online`. For a volume never
    scrubbed, the interval counts from its creation.
    """
    if record.get("deleting"):
        return False
    holders = [node for node in record.get("replica_nodes") or [] if node in online]
    if not holders or holders[0] != node_id:
        return False
    scrub = record.get("scrub")
    last = scrub.get("last_ns") if isinstance(scrub, dict) else None
    since = int(last or record.get("ctime_ns") or 0)
    return now_ns - since >= interval * 1e9


def scrub_step(rate_bytes: float | None, replicas: int) -> int:
    """Return the blocks per checksums call of a scrub, about one second of reads at the rate.

    Small steps spread a slow scrub evenly, instead of reading up to 64 MiB per replica in one
    burst under the replica's lock and then sleeping. The step is 16 to MAX_CHECKED_PER_CALL
    blocks.
    """
    if rate_bytes is None or rate_bytes <= 0:
        return MAX_CHECKED_PER_CALL
    blocks = int(rate_bytes // (BLOCK_SIZE * max(1, replicas)))
    return max(16, min(MAX_CHECKED_PER_CALL, blocks))


def rate_delay(read_bytes: int, rate_bytes: float | None, elapsed: float) -> float:
    """Return how long to sleep so that `read_bytes` in `elapsed` s stay within the rate."""
    if rate_bytes is None or rate_bytes <= 0:
        return 0.0
    return max(0.0, read_bytes / rate_bytes - elapsed)


@dataclass
class ScrubResult:
    """The outcome of one scrub of one volume."""

    checked_blocks: int = 0
    repaired: list[tuple[int, str]] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)
    skipped_blocks: int = 0

    @property
    def lost_blocks(self) -> int:
        """The number of blocks without a good copy. `lost` lists each of their bad copies."""
        return len({blockno for blockno, _ in self.lost})

    def to_map(self) -> dict[str, Any]:
        """Return the result as the control method sends it."""
        return {
            "checked_blocks": self.checked_blocks,
            "repaired_blocks": len(self.repaired),
            "repaired": [[block, node] for block, node in self.repaired[:LISTED_BLOCKS]],
            "lost_blocks": self.lost_blocks,
            "lost": [[block, node] for block, node in self.lost[:LISTED_BLOCKS]],
            "skipped_blocks": self.skipped_blocks,
        }


async def _call(node: str, client: RpcClient, method: str, *args: Any) -> Any:
    """Call `method` on one replica and name the node in any error it raises.

    A timeout or a lost connection raises Unavailable.
    """
    try:
        with trio.fail_after(REPLICA_TIMEOUT):
            return await client.call(method, *args)
    except trio.TooSlowError:
        raise Unavailable(
            f"replica node {node} did not respond to {method} within {REPLICA_TIMEOUT:g} s"
        ) from None
    except Unavailable as exc:
        raise Unavailable(f"{method} on replica node {node} failed: {exc.message}") from None
    except PxfsError as exc:
        raise type(exc)(f"{method} on replica node {node} failed: {exc.message}") from None


async def _fetch_checksums(
    vol_id: str, replicas: dict[str, RpcClient], first: int, count: int, check_data: bool
) -> dict[str, list[BlockCopy]]:
    """Read and decode the records of one block range from every replica at once."""
    raw = await _fetch_raw(vol_id, replicas, first, count, check_data)
    return {node: decode_checksums(raw[node]) for node in replicas}


async def _fetch_raw(
    vol_id: str, replicas: dict[str, RpcClient], first: int, count: int, check_data: bool
) -> dict[str, bytes]:
    """Read the raw records of one block range from every replica at once."""
    raw: dict[str, bytes] = {}
    failures: list[PxfsError] = []

    async def fetch(node: str, client: RpcClient) -> None:
        # Caught here, so that the caller gets the replica's error and not an ExceptionGroup.
        try:
            raw[node] = await _call(
                node, client, "store.checksums", vol_id, first, count, check_data
            )
        except PxfsError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for node, client in replicas.items():
            nursery.start_soon(fetch, node, client)
    if failures:
        raise failures[0]
    for node, records in raw.items():
        if not isinstance(records, bytes) or len(records) != count * _RECORD.size:
            raise Unavailable(f"replica node {node} did not return {count} block records")
    return raw


async def replica_blocks(vol_id: str, replicas: dict[str, RpcClient]) -> dict[str, int]:
    """Return the number of blocks of each replica."""
    sizes = {}
    for node, client in replicas.items():
        info = await _call(node, client, "store.info", vol_id)
        sizes[node] = int(info["nblocks"])
    return sizes


async def verify_replicas(
    vol_id: str, replicas: dict[str, RpcClient], *, check_data: bool, recheck: bool
) -> dict[str, Any]:
    """Compare every block of the replicas and return the differing blocks and the counts.

    With `recheck`, for a mounted volume, a range with differences is read again after
    RECHECK_DELAY, and only blocks that differ both times are reported.
    """
    sizes = await replica_blocks(vol_id, replicas)
    nblocks = min(sizes.values())
    step = MAX_CHECKED_PER_CALL if check_data else VERIFY_TABLE_BLOCKS
    allocated = 0
    differing: list[int] = []
    listed: list[dict[str, Any]] = []
    for first in range(0, nblocks, step):
        count = min(step, nblocks - first)
        raw = await _fetch_raw(vol_id, replicas, first, count, check_data)
        if not check_data and len(set(raw.values())) == 1:
            # The tables are equal, so every block agrees and only the written ones are counted.
            allocated += written_count(next(iter(raw.values())))
            continue
        copies = {node: decode_checksums(raw[node]) for node in replicas}
        allocated += allocated_count(copies)
        found = differing_blocks(first, copies)
        if found and recheck:
            await trio.sleep(RECHECK_DELAY)
            copies = await _fetch_checksums(vol_id, replicas, first, count, check_data)
            found = sorted(set(found) & set(differing_blocks(first, copies)))
        differing += found
        for blockno in found[: max(0, LISTED_BLOCKS - len(listed))]:
            listed.append(
                {
                    "block": blockno,
                    "copies": {node: column[blockno - first].describe()
                               for node, column in copies.items()},
                }
            )  # fmt: skip
    problems = []
    if len(set(sizes.values())) > 1:
        problems.append(
            "the replicas have different sizes: "
            + ", ".join(f"{node} {size} blocks" for node, size in sizes.items())
        )
    return {
        "identical": not differing and not problems,
        "replicas": list(replicas),
        "blocks": nblocks,
        "allocated_blocks": allocated,
        "differing_blocks": len(differing),
        "differences": listed,
        "problems": problems,
        "check_data": check_data,
    }


async def scrub_replicas(
    vol_id: str,
    epoch: int,
    replicas: dict[str, RpcClient],
    write_set: Sequence[str],
    *,
    rate_bytes: float | None = None,
    refresh_epoch: Callable[[], Awaitable[int]] | None = None,
) -> ScrubResult:
    """Check every written block of every replica and repair bad copies from good ones.

    `rate_bytes` bounds the bytes read per second, summed over the replicas, and None reads at
    full speed. When a replica rejects a repair with StaleEpoch, because the volume was attached
    since the scrub started, `refresh_epoch` returns the current epoch, and the repair is sent
    once more with it.
    """
    result = ScrubResult()
    sizes = await replica_blocks(vol_id, replicas)
    nblocks = min(sizes.values())
    started = trio.current_time()
    read_bytes = 0
    step = scrub_step(rate_bytes, len(replicas))
    for first in range(0, nblocks, step):
        count = min(step, nblocks - first)
        copies = await _fetch_checksums(vol_id, replicas, first, count, True)
        written = sum(1 for column in copies.values() for copy in column if copy.state != UNWRITTEN)
        result.checked_blocks += written
        read_bytes += written * BLOCK_SIZE
        for plan in plan_repairs(first, copies, write_set):
            try:
                await _carry_out(vol_id, epoch, replicas, plan, result)
            except StaleEpoch:
                if refresh_epoch is None:
                    raise
                epoch = await refresh_epoch()
                log.info("volume %s: scrub goes on at the new epoch %d", vol_id, epoch)
                await _carry_out(vol_id, epoch, replicas, plan, result)
        delay = rate_delay(read_bytes, rate_bytes, trio.current_time() - started)
        await trio.sleep(delay)
    return result


async def _carry_out(
    vol_id: str, epoch: int, replicas: dict[str, RpcClient], plan: RepairPlan, result: ScrubResult
) -> None:
    if plan.outcome == "lost":
        log.error(
            "volume %s: block %d (version %x) is lost: no replica of the write set has a good "
            "copy; the bad copy on replica %s is left as it is",
            vol_id, plan.blockno, plan.version, plan.target,
        )  # fmt: skip
        result.lost.append((plan.blockno, plan.target))
        return
    if plan.outcome == "skip" or plan.source is None:
        log.info(
            "volume %s: block %d on replica %s is bad at version %x, which no good copy has; "
            "left for resync",
            vol_id, plan.blockno, plan.target, plan.version,
        )  # fmt: skip
        result.skipped_blocks += 1
        return
    source = replicas[plan.source]
    [[version, data]] = await _call(
        plan.source, source, "store.read_versioned", vol_id, [plan.blockno]
    )
    if version != plan.version or not isinstance(data, bytes):
        # A write changed the source since the scan, and it reaches the target as well.
        result.skipped_blocks += 1
        return
    stored = await _call(
        plan.target, replicas[plan.target], "store.copy", vol_id, epoch,
        [[plan.blockno, plan.version, plan.version, data]],
    )  # fmt: skip
    if not stored:
        result.skipped_blocks += 1
        return
    log.warning(
        "volume %s: scrub repaired block %d (version %x) on replica %s from replica %s",
        vol_id, plan.blockno, plan.version, plan.target, plan.source,
    )  # fmt: skip
    result.repaired.append((plan.blockno, plan.target))


def _scrub_totals(record: VolumeRecord, result: ScrubResult, now_ns: int) -> dict[str, int]:
    """Return the record's "scrub" map with one more run added."""
    old = record.get("scrub")
    totals: dict[str, int] = dict(old) if isinstance(old, dict) else {}
    return {
        "runs": int(totals.get("runs", 0)) + 1,
        "last_ns": now_ns,
        "last_checked_blocks": result.checked_blocks,
        "last_lost_blocks": result.lost_blocks,
        "repaired_blocks": int(totals.get("repaired_blocks", 0)) + len(result.repaired),
        "lost_blocks": int(totals.get("lost_blocks", 0)) + result.lost_blocks,
    }


class Scrubber:
    """The verify and scrub service of pxd, which connects to the replicas of a volume.

    It records the scrub totals in the volume's catalog record.
    """

    def __init__(
        self,
        catalog: Catalog,
        peers: Peers,
        node_id: str,
        interval: float,
        rate_mib: float,
    ) -> None:
        self._catalog = catalog
        self._peers = peers
        self._node_id = node_id
        self.interval = interval
        self.rate_bytes = rate_mib * (1 << 20)
        self._running: set[str] = set()
        #: The trio.current_time() of the last failed periodic scrub, by volume id.
        self._failed_at: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def _connect(self, record: VolumeRecord) -> AsyncIterator[dict[str, RpcClient]]:
        """Connect to every replica of `record`. Raises Unavailable if one does not respond."""
        async with contextlib.AsyncExitStack() as stack:
            replicas: dict[str, RpcClient] = {}
            for node in record.get("replica_nodes") or []:
                try:
                    with trio.fail_after(REPLICA_TIMEOUT):
                        clients = await stack.enter_async_context(self._peers.connect([node]))
                except trio.TooSlowError:
                    raise Unavailable(
                        f"replica node {node} of volume {record['name']} did not respond within "
                        f"{REPLICA_TIMEOUT:g} s"
                    ) from None
                except (PxfsError, OSError) as exc:
                    message = exc.message if isinstance(exc, PxfsError) else str(exc)
                    raise Unavailable(
                        f"replica node {node} of volume {record['name']} could not be reached: "
                        f"{message}"
                    ) from None
                replicas[node] = clients[0]
            if not replicas:
                raise InvalidArgument(f"volume {record['name']} has no replica nodes")
            yield replicas

    @contextlib.contextmanager
    def _exclusive(self, record: VolumeRecord) -> Any:
        if record["id"] in self._running:
            raise Busy(f"a scrub of volume {record['name']} is already running on this node")
        self._running.add(record["id"])
        try:
            yield
        finally:
            self._running.discard(record["id"])

    async def verify(self, ref: Any, check_data: Any = False) -> dict[str, Any]:
        """Compare the replicas of the volume `ref`. The result's "identical" is the verdict."""
        if not isinstance(check_data, bool):
            raise InvalidArgument(f"check_data must be true or false, not {check_data!r}")
        record = await self._catalog.find_volume(ref)
        async with self._connect(record) as replicas:
            result = await verify_replicas(
                record["id"], replicas, check_data=check_data,
                recheck=bool(record.get("attached_on")),
            )  # fmt: skip
        level = logging.INFO if result["identical"] else logging.WARNING
        log.log(
            level, "volume %s: verify found %d differing blocks among %d allocated",
            record["id"], result["differing_blocks"], result["allocated_blocks"],
        )  # fmt: skip
        return {"id": record["id"], "name": record["name"], **result}

    async def scrub(self, ref: Any) -> dict[str, Any]:
        """Scrub the volume `ref` at full speed; return what was checked, repaired and lost."""
        record = await self._catalog.find_volume(ref)
        result = await self._scrub_record(record, None)
        return {"id": record["id"], "name": record["name"], **result.to_map()}

    async def _scrub_record(self, record: VolumeRecord, rate_bytes: float | None) -> ScrubResult:
        if record.get("deleting"):
            raise Busy(f"volume {record['name']} is being deleted")
        write_set = record.get("write_set") or record.get("replica_nodes") or []
        with self._exclusive(record):
            async with self._connect(record) as replicas:
                result = await scrub_replicas(
                    record["id"], int(record.get("epoch") or 0), replicas, write_set,
                    rate_bytes=rate_bytes, refresh_epoch=functools.partial(self._epoch, record),
                )  # fmt: skip
        now = time.time_ns()
        await self._catalog.update_volume(
            record["id"], lambda current: {**current, "scrub": _scrub_totals(current, result, now)}
        )
        log.info(
            "volume %s: scrub checked %d blocks, repaired %d, lost %d, skipped %d",
            record["id"], result.checked_blocks, len(result.repaired), result.lost_blocks,
            result.skipped_blocks,
        )  # fmt: skip
        return result

    async def _epoch(self, record: VolumeRecord) -> int:
        current = await self._catalog.find_volume(record["id"])
        return int(current.get("epoch") or 0)

    async def run_periodically(self) -> None:
        """Scrub each due volume at `rate_bytes`, forever. An interval of 0 or less turns it off."""
        if self.interval <= 0:
            log.info("periodic scrub is off (scrub_interval_seconds = 0)")
            return
        log.info(
            "periodic scrub: every %g s at %g MiB/s", self.interval, self.rate_bytes / (1 << 20)
        )
        while True:
            await trio.sleep(min(self.interval, PERIODIC_POLL))
            await self._scrub_due()

    async def _scrub_due(self) -> None:
        try:
            nodes = await self._catalog.list_nodes()
            volumes = await self._catalog.list_volumes()
        except PxfsError as exc:
            log.warning("periodic scrub: reading the catalog failed: %s", exc.message)
            return
        online = {node["id"] for node in nodes if node.get("online")} | {self._node_id}
        retry = min(self.interval, RETRY_AFTER_FAILURE)
        for record in volumes:
            if not is_due(record, self._node_id, online, self.interval, time.time_ns()):
                continue
            failed_at = self._failed_at.get(record["id"])
            if failed_at is not None and trio.current_time() - failed_at < retry:
                continue
            try:
                await self._scrub_record(record, self.rate_bytes)
            except PxfsError as exc:
                self._failed_at[record["id"]] = trio.current_time()
                log.warning(
                    "volume %s: periodic scrub failed, next try in %g s: %s",
                    record["id"], retry, exc.message,
                )  # fmt: skip
            else:
                self._failed_at.pop(record["id"], None)
