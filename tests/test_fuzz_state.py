"""Property and fuzz tests of the catalog and replica meta files (pxfs.catalog, pxfs.replicaformat).

A catalog file that `_load` cannot trust must raise Corrupted, and one that it returns must
satisfy the checks that `_load` promises. A replica meta file must parse into (nblocks, epoch)
within their ranges or raise Corrupted. No other exception is allowed.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pxfs import catalog, replicaformat
from pxfs.errors import Corrupted

# No example database, so a run leaves no files behind. The deadline catches a parser that loops.
FUZZ = settings(database=None, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
MUTATIONS = 10


def fuzz(examples: int) -> settings:
    """Return the fuzz settings with `examples` inputs per run."""
    return settings(FUZZ, max_examples=examples)


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    """A directory that every example of the module reuses for its one file."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pxfs-fuzz-") as directory:
        yield Path(directory)


def mutants(data: bytes, seed: int) -> list[bytes]:
    """Return MUTATIONS copies of `data` with 1 to 4 bytes overwritten, cut or inserted."""
    rng = random.Random(seed)
    out = []
    for _ in range(MUTATIONS):
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            action = rng.randrange(3)
            index = rng.randrange(len(mutant) + 1)
            if action == 0 and index < len(mutant):
                mutant[index] = rng.choice(b'{}[]",:0123456789 -.tfnaeluxyz\xff')
            elif action == 1:
                del mutant[index:]
            else:
                mutant[index:index] = bytes([rng.randrange(256)])
        out.append(bytes(mutant))
    return out


# --- the catalog file -----------------------------------------------------------------------------


def valid_catalog(volumes: int) -> dict[str, Any]:
    """Return a catalog state with `volumes` complete records and one node."""
    records = {}
    for index in range(volumes):
        vol_id = str(1000 + index)
        record = {
            "id": vol_id,
            "name": f"vol{index}",
            "labels": {"app": "db"},
            "size": 1 << 30,
            "ha_level": 1 + index % 3,
            "epoch": index,
            "attached_on": "node-a" if index % 2 else "",
            "mount_paths": ["/mnt/a"] if index % 2 else [],
        }
        records[vol_id] = {"revision": index + 1, "record": record}
    nodes = {"node-a": {"id": "node-a", "address": "127.0.0.1"}}
    return {
        "format": catalog.FORMAT_VERSION,
        "revision": volumes + 1,
        "volumes": records,
        "nodes": nodes,
    }


def check_loaded_catalog(state: dict[str, Any]) -> None:
    """Assert what `_load` promises about a state that it returns."""
    assert state["format"] == catalog.FORMAT_VERSION
    assert isinstance(state["revision"], int)
    for key, entry in state["volumes"].items():
        assert isinstance(entry["revision"], int)
        record = entry["record"]
        assert record["id"] == key
        assert isinstance(record["name"], str)
        for path in record.get("mount_paths") or []:
            assert isinstance(path, str)
        for value in (record.get("labels") or {}).values():
            assert isinstance(value, str)
    for key, node in state["nodes"].items():
        assert node["id"] == key


def load_catalog(directory: Path, data: bytes) -> dict[str, Any] | None:
    """Write `data` as the catalog file and load it; return None when it is Corrupted."""
    path = directory / catalog.CATALOG_FILE
    path.write_bytes(data)
    try:
        return catalog._load(path)
    except Corrupted:
        return None


@fuzz(150)
@given(st.integers(0, 4), st.integers(0, 2**32), st.booleans())
def test_mutated_catalog_loads_or_corrupted(
    state_dir: Path, volumes: int, seed: int, indent: bool
) -> None:
    """150 valid catalogs, 10 mutants each (1500 files): a checked state or Corrupted."""
    text = json.dumps(valid_catalog(volumes), indent=1 if indent else None).encode()
    for mutant in mutants(text, seed):
        state = load_catalog(state_dir, mutant)
        if state is not None:
            check_loaded_catalog(state)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
FIELD_NAMES = ["id", "name", "labels", "size", "ha_level", "epoch", "attached_on", "mount_paths"]


@st.composite
def retyped_catalogs(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a valid catalog with one to three values replaced by values of random types."""
    state = valid_catalog(draw(st.integers(1, 3)))
    vol_ids = sorted(state["volumes"])
    for _ in range(draw(st.integers(1, 3))):
        value = draw(json_values.filter(lambda item: item is not None))
        target = draw(st.sampled_from(["state", "entry", "record", "node"]))
        entry = state["volumes"].get(draw(st.sampled_from(vol_ids)))
        if target == "state":
            state[draw(st.sampled_from(["format", "revision", "volumes", "nodes"]))] = value
            break
        if not isinstance(entry, dict):
            break
        if target == "entry":
            entry[draw(st.sampled_from(["revision", "record"]))] = value
        elif target == "record" and isinstance(entry.get("record"), dict):
            entry["record"][draw(st.sampled_from(FIELD_NAMES))] = value
        elif target == "node":
            state["nodes"]["node-a"] = value
    return state


@fuzz(200)
@given(retyped_catalogs())
def test_retyped_catalog_loads_or_corrupted(state_dir: Path, state: dict[str, Any]) -> None:
    """200 catalogs with values of random types: a checked state or Corrupted."""
    loaded = load_catalog(state_dir, json.dumps(state).encode())
    if loaded is not None:
        check_loaded_catalog(loaded)


@fuzz(200)
@given(st.binary(max_size=64) | json_values.map(lambda value: json.dumps(value).encode()))
def test_random_catalog_bytes_corrupted(state_dir: Path, data: bytes) -> None:
    """200 random byte strings and JSON values: Corrupted unless they form a valid catalog."""
    loaded = load_catalog(state_dir, data)
    if loaded is not None:
        check_loaded_catalog(loaded)


# json.loads raises RecursionError for deep nesting, which is not a ValueError.
def test_deeply_nested_catalog_corrupted(state_dir: Path) -> None:
    with pytest.raises(Corrupted):
        catalog._load(write(state_dir, b"[" * 100_000))


@pytest.mark.parametrize("field", ["mount_paths", "labels"])
def test_null_optional_field_loads(state_dir: Path, field: str) -> None:
    """A null optional field counts as absent, as the field check treats every null."""
    state = valid_catalog(1)
    state["volumes"]["1000"]["record"][field] = None
    loaded = catalog._load(write(state_dir, json.dumps(state).encode()))
    assert loaded["volumes"]["1000"]["record"][field] is None
    check_loaded_catalog(loaded)


@pytest.mark.parametrize("value", [1, None, ["db"], {"nested": "map"}])
def test_non_string_label_corrupted(state_dir: Path, value: Any) -> None:
    state = valid_catalog(1)
    state["volumes"]["1000"]["record"]["labels"] = {"app": value}
    with pytest.raises(Corrupted, match="label value"):
        catalog._load(write(state_dir, json.dumps(state).encode()))


def write(directory: Path, data: bytes) -> Path:
    """Write `data` as the catalog file and return its path."""
    path = directory / catalog.CATALOG_FILE
    path.write_bytes(data)
    return path


# --- the replica meta file ------------------------------------------------------------------------

VOL_ID = "4242"


def valid_meta(nblocks: int, epoch: int) -> bytes:
    """Return a meta file as the store writes it."""
    meta = {
        "format": replicaformat.FORMAT_VERSION,
        "vol_id": VOL_ID,
        "nblocks": nblocks,
        "epoch": epoch,
    }
    return msgpack.packb(meta, use_bin_type=True)


def parse_meta(raw: bytes) -> tuple[int, int] | None:
    """Parse `raw` as the meta of VOL_ID; return None when it is Corrupted."""
    try:
        return replicaformat.parse_meta(raw, VOL_ID, Path("/replicas") / VOL_ID / "meta")
    except Corrupted:
        return None


def check_meta(parsed: tuple[int, int]) -> None:
    """Assert the documented ranges of nblocks and epoch."""
    nblocks, epoch = parsed
    assert isinstance(nblocks, int)
    assert isinstance(epoch, int)
    assert 0 < nblocks <= replicaformat.MAX_NBLOCKS
    assert 0 <= epoch <= replicaformat.MAX_EPOCH


@fuzz(300)
@given(
    st.integers(1, replicaformat.MAX_NBLOCKS),
    st.integers(0, replicaformat.MAX_EPOCH),
    st.integers(0, 2**32),
)
def test_mutated_meta_parses_or_corrupted(nblocks: int, epoch: int, seed: int) -> None:
    """300 valid meta files, 10 mutants each (3000 files): in-range values or Corrupted."""
    raw = valid_meta(nblocks, epoch)
    assert parse_meta(raw) == (nblocks, epoch)
    for mutant in mutants(raw, seed):
        parsed = parse_meta(mutant)
        if parsed is not None:
            check_meta(parsed)


@fuzz(200)
@given(
    st.dictionaries(
        st.sampled_from(["format", "vol_id", "nblocks", "epoch", "x"]),
        json_values | st.binary(max_size=4) | st.integers(-(2**63), 2**64 - 1),
        max_size=5,
    )
    | json_values
)
def test_retyped_meta_parses_or_corrupted(meta: Any) -> None:
    """200 meta maps and values of random types: in-range values or Corrupted."""
    parsed = parse_meta(msgpack.packb(meta, use_bin_type=True))
    if parsed is not None:
        check_meta(parsed)


@fuzz(300)
@given(st.binary(max_size=64))
def test_random_meta_bytes_corrupted(raw: bytes) -> None:
    """300 random byte strings: in-range values or Corrupted."""
    parsed = parse_meta(raw)
    if parsed is not None:
        check_meta(parsed)
