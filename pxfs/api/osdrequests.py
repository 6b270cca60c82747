"""OSD REST request bodies and query parameters, parsed into the arguments of control calls.

Request bodies are decoded the way Go's encoding/json decodes them: key matching is
case-insensitive, unknown keys are ignored and a JSON null counts as absent. decode_body
also decodes the bodies of Docker's plugin protocol.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pxfs import errors, units
from pxfs.api.control import volume_create_argument
from pxfs.api.osd import ACTION_NONE, ACTION_OFF, ACTION_ON, FS_TYPE_FUSE

#: Largest replica count pxfs places (one replica per node, at most three).
MAX_HA_LEVEL = 3

#: Volume features that openstorage clients may request and pxfs does not have. A request that
#: switches one on is rejected, because silently creating the volume without the feature (an
#: unencrypted volume where encryption was requested) would mislead the client.
UNSUPPORTED_FLAGS = ("shared", "sharedv4", "encrypted", "sticky", "compressed", "dedupe")

_ABSENT: Any = object()


@dataclass
class CreateRequest:
    """A parsed VolumeCreateRequest: the arguments of the control call volume.create."""

    name: str
    size: int
    ha_level: int
    labels: dict[str, str]
    #: The ids or IPs of the nodes to place the replicas on; None lets pxd choose them.
    nodes: list[str] | None = None

    def to_rpc(self) -> dict[str, Any]:
        """Return the argument of volume.create."""
        return volume_create_argument(self)


@dataclass
class SetRequest:
    """A parsed VolumeSetRequest; None and ACTION_NONE mean that the body did not set the key."""

    name: str | None = None
    labels: dict[str, str] | None = None
    size: int | None = None
    ha_level: int | None = None
    replica_nodes: list[str] | None = None
    attach: int = ACTION_NONE
    mount: int = ACTION_NONE
    mount_path: str = ""
    options: dict[str, str] = field(default_factory=dict)

    @property
    def updates_volume(self) -> bool:
        """True when the body requests a change of the volume's locator or spec."""
        changes = (self.name, self.labels, self.size, self.ha_level, self.replica_nodes)
        return any(change is not None for change in changes)

    def changes(self) -> dict[str, Any]:
        """Return the argument of volume.update: only the keys that the body set."""
        changes: dict[str, Any] = {}
        if self.size is not None:
            changes["size"] = self.size
        if self.ha_level is not None:
            changes["ha_level"] = self.ha_level
        if self.labels is not None:
            changes["labels"] = dict(self.labels)
        return changes


def decode_body(body: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """Decode a JSON request body that must be an object; raises InvalidArgument.

    With `allow_empty`, an empty body and a JSON null decode to an empty object, because
    Docker's plugin protocol sends some requests, such as Plugin.Activate, without a body.
    Without it both raise, as the REST routes that read a body need a JSON object.
    """
    if not body.strip():
        if allow_empty:
            return {}
        raise errors.InvalidArgument("request body is empty: expected a JSON object")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.InvalidArgument(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        # The json module recurses once per nested array or object, so a body of many "["
        # exhausts the stack. No request of either API nests more than a few levels.
        raise errors.InvalidArgument("request body is not valid JSON: nested too deeply") from None
    except ValueError:
        # int() rejects a literal of more digits than sys.get_int_max_str_digits() (4300 by
        # default in CPython 3.11), and json.loads raises that ValueError unchanged.
        limit = sys.get_int_max_str_digits()
        raise errors.InvalidArgument(
            f"request body is not valid JSON: a number has more than {limit} digits"
        ) from None
    if value is None and allow_empty:
        return {}
    if not isinstance(value, dict):
        preview = _shorten(_kind(value))
        raise errors.InvalidArgument(f"request body must be a JSON object, got {preview}")
    return value


def parse_create_request(body: Mapping[str, Any]) -> CreateRequest:
    """Parse a VolumeCreateRequest; raises InvalidArgument naming the offending key."""
    locator = _object(body, "locator", "locator")
    spec = _object(body, "spec", "spec")
    source = _object(body, "source", "source")

    name = _string(locator, "name", "locator.name")
    if not name:
        raise errors.InvalidArgument("locator.name is required: the name of the new volume")
    units.validate_name(name)
    if _string(source, "parent", "source.parent"):
        raise errors.InvalidArgument("source.parent is not supported: pxfs cannot clone volumes")

    size = _integer(spec, "size", "spec.size", default=0)
    if size <= 0:
        raise errors.InvalidArgument("spec.size is required: the volume size in bytes")
    ha_level = _integer(spec, "ha_level", "spec.ha_level", default=0) or 1
    _check_ha_level(ha_level)
    _check_format(spec)
    _check_unsupported(spec)
    # An empty list is what a Go client sends for no replica set, so pxd chooses the nodes.
    nodes = _replica_nodes(spec) or None

    # Spec labels are deprecated in openstorage; the locator's labels win where both set a key.
    labels = _string_map(spec, "volume_labels", "spec.volume_labels") or {}
    labels.update(_string_map(locator, "volume_labels", "locator.volume_labels") or {})
    units.validate_labels(labels)
    return CreateRequest(
        name=name, size=units.check_size(size), ha_level=ha_level, labels=labels, nodes=nodes
    )


def parse_set_request(body: Mapping[str, Any]) -> SetRequest:
    """Parse a VolumeSetRequest, keeping only the keys that the body sets."""
    locator = _object(body, "locator", "locator")
    spec = _object(body, "spec", "spec")
    action = _object(body, "action", "action")

    request = SetRequest()
    if locator:
        request.name = _string(locator, "name", "locator.name") or None
    if spec:
        # A zero size or HA level is what encoding/json leaves for an absent key, so openstorage
        # treats zero as "no change", and so does pxfs.
        size = _integer(spec, "size", "spec.size", default=0)
        ha_level = _integer(spec, "ha_level", "spec.ha_level", default=0)
        request.size = units.check_size(size) if size else None
        request.ha_level = ha_level or None
        if ha_level:
            _check_ha_level(ha_level)
        request.replica_nodes = _replica_nodes(spec)
        _check_format(spec)
        _check_unsupported(spec)
    request.labels = _set_labels(locator, spec)
    if action:
        request.attach = _action(action, "attach")
        request.mount = _action(action, "mount")
        request.mount_path = _string(action, "mount_path", "action.mount_path")
    request.options = _string_map(body, "options", "options") or {}
    return request


def check_set_request(request: SetRequest, record: Mapping[str, Any]) -> None:
    """Raise NotSupported when `request` renames the volume or moves its replicas.

    pxd has no control call for either, so a PUT may only repeat the current name and replica
    nodes. Size, HA level and labels go to volume.update, which validates them itself.
    """
    ref = record["name"]
    if request.name is not None and request.name != record["name"]:
        raise errors.NotSupported(f"renaming volume {ref} is not supported")
    current_nodes = sorted(str(node) for node in record.get("replica_nodes") or [])
    if request.replica_nodes and sorted(request.replica_nodes) != current_nodes:
        raise errors.NotSupported(f"moving the replicas of volume {ref} is not supported")


def _set_labels(locator: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, str] | None:
    """Return the label map that a PUT sets, merged as at create, or None when it sets none."""
    spec_labels = _string_map(spec, "volume_labels", "spec.volume_labels")
    locator_labels = _string_map(locator, "volume_labels", "locator.volume_labels")
    if spec_labels is None and locator_labels is None:
        return None
    labels = dict(spec_labels or {})
    labels.update(locator_labels or {})
    return units.validate_labels(labels)


def parse_label_query(values: list[str], key: str) -> dict[str, str]:
    """Parse the JSON label maps of repeated `Label` or `ConfigLabel` query parameters."""
    labels: dict[str, str] = {}
    for value in values:
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise errors.InvalidArgument(
                f"query parameter {key} must be a JSON object of strings, got {value!r}"
            ) from None
        labels.update(_check_string_map(decoded, key))
    return labels


def parse_bytes_used_request(body: Mapping[str, Any]) -> tuple[str, list[int]]:
    """Parse the body of POST /v1/osd-volumes/bytesused into its node id and volume ids."""
    node_id = _string(body, "node_id", "node_id")
    ids = _lookup(body, "ids")
    if ids is _ABSENT:
        return node_id, []
    valid = isinstance(ids, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 1 << 64 for item in ids
    )
    if not valid:
        preview = _shorten(json.dumps(ids))
        raise errors.InvalidArgument(
            f"ids must be a list of volume ids (unsigned integers), got {preview}"
        )
    return node_id, list(ids)


def _lookup(obj: Mapping[str, Any], key: str) -> Any:
    """Find `key` as encoding/json does: the exact key first, then any case-insensitive one."""
    if key in obj:
        value = obj[key]
    else:
        lowered = key.lower()
        value = next((v for k, v in obj.items() if k.lower() == lowered), None)
    return _ABSENT if value is None else value


def _object(obj: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return {}
    if not isinstance(value, dict):
        raise errors.InvalidArgument(f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return ""
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{where} must be a string, got {_kind(value)}")
    return _check_unicode(value, where)


def _check_unicode(value: str, where: str) -> str:
    """Return `value` unless it contains a lone surrogate, which has no UTF-8 form."""
    # JSON escapes such as "\udcff" decode to lone surrogates, which pxd could not receive.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start : exc.end]
        raise errors.InvalidArgument(
            f"{where} is not valid Unicode: it contains the lone surrogate {bad!r}"
        ) from None
    return value


def _integer(obj: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidArgument(
            f"{where} must be a non-negative integer, got {json.dumps(value)}"
        )
    return value


def _boolean(obj: Mapping[str, Any], key: str, where: str) -> bool:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return False
    if not isinstance(value, bool):
        raise errors.InvalidArgument(f"{where} must be true or false, got {json.dumps(value)}")
    return value


def _string_map(obj: Mapping[str, Any], key: str, where: str) -> dict[str, str] | None:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return None
    return _check_string_map(value, where)


def _check_string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise errors.InvalidArgument(
            f"{where} must be a JSON object of strings, got {_kind(value)}"
        )
    for item_key, item in value.items():
        if not isinstance(item, str):
            raise errors.InvalidArgument(
                f"{where}[{item_key!r}] must be a string, got {json.dumps(item)}"
            )
        _check_unicode(item_key, f"a key of {where}")
        _check_unicode(item, f"{where}[{item_key!r}]")
    return dict(value)


def _action(action: Mapping[str, Any], key: str) -> int:
    value = _integer(action, key, f"action.{key}", default=ACTION_NONE)
    if value not in (ACTION_NONE, ACTION_OFF, ACTION_ON):
        raise errors.InvalidArgument(
            f"action.{key} must be 0 (none), 1 (off) or 2 (on), got {value}"
        )
    return value


def _replica_nodes(spec: Mapping[str, Any]) -> list[str] | None:
    replica_set = _object(spec, "replica_set", "spec.replica_set")
    nodes = _lookup(replica_set, "nodes")
    if nodes is _ABSENT:
        return None
    if not isinstance(nodes, list) or not all(isinstance(node, str) for node in nodes):
        raise errors.InvalidArgument("spec.replica_set.nodes must be a list of node ids")
    return list(nodes)


def _check_ha_level(ha_level: int) -> None:
    if not 1 <= ha_level <= MAX_HA_LEVEL:
        raise errors.InvalidArgument(
            f"spec.ha_level must be between 1 and {MAX_HA_LEVEL}, got {ha_level}"
        )


def _check_format(spec: Mapping[str, Any]) -> None:
    fs_format = _integer(spec, "format", "spec.format", default=0)
    if fs_format not in (0, FS_TYPE_FUSE):
        raise errors.InvalidArgument(
            f"spec.format {fs_format} is not supported: pxfs volumes are FUSE filesystems "
            f"(format {FS_TYPE_FUSE}); leave format out or set it to {FS_TYPE_FUSE}"
        )


def _check_unsupported(spec: Mapping[str, Any]) -> None:
    for flag in UNSUPPORTED_FLAGS:
        if _boolean(spec, flag, f"spec.{flag}"):
            raise errors.InvalidArgument(f"spec.{flag} is not supported by pxfs")
    if _string(spec, "passphrase", "spec.passphrase"):
        raise errors.InvalidArgument("spec.passphrase is not supported: pxfs cannot encrypt")


def _shorten(text: str, limit: int = 80) -> str:
    """Cut `text` to `limit` characters and mark the cut with "...", for an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return json.dumps(value)
