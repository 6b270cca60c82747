"""The options of a Docker volume Create: DriverOpts and inline specs in the volume name.

`docker volume create --opt KEY=VALUE NAME` sends the options as DriverOpts, and a name such as
"name=vol,size=10G,repl=2" carries them inline. parse_create turns either into a CreateSpec, the
argument of pxd's volume.create.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from pxfs import errors, units
from pxfs.api.control import volume_create_argument

log = logging.getLogger(__name__)

#: A volume created without a size option gets pxctl's default size.
DEFAULT_SIZE = 1 << 30
MAX_HA_LEVEL = 3

_INLINE_NAME = re.compile(r"[0-9A-Za-z_-]+")
_INLINE_SEPARATORS = re.compile(r"[,;]")
_TRUE = {"1", "t", "true"}
_FALSE = {"0", "f", "false"}

#: Options that switch on a feature pxfs lacks, mapped to the feature. Creating the volume
#: without it would mislead the caller (an unencrypted volume where encryption was asked for),
#: so a true value is rejected.
_FEATURE_FLAGS = {
    "shared": "shared access from several nodes",
    "sharedv4": "shared access from several nodes",
    "secure": "encryption",
    "sticky": "sticky volumes",
    "compressed": "compression",
    "dedupe": "deduplication",
}
#: Options that pxfs rejects whenever they carry a value.
_UNSUPPORTED_VALUES = {
    "secret_key": "pxfs volumes have no encryption",
    "parent": "pxfs cannot clone volumes",
}
#: Authentication options of openstorage; they describe the caller, not the volume.
_DROPPED = {"token", "token_secret"}


@dataclass
class CreateSpec:
    """A volume to create, parsed from a Create request."""

    name: str
    size: int = DEFAULT_SIZE
    ha_level: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    #: True when size or repl was given, so an existing volume of this name must match them.
    explicit: bool = False
    #: The ids or IPs of the nodes to place the replicas on; None lets pxd choose them.
    nodes: list[str] | None = None

    def to_rpc(self) -> dict[str, Any]:
        """Return the argument of pxd's volume.create."""
        return volume_create_argument(self)


def parse_inline(text: str) -> dict[str, str] | None:
    """Parse an inline spec such as "name=vol,size=10G,repl=2", or return None for a plain name.

    A name is inline when one of its `,`- or `;`-separated parts is name=<letters, digits, _ or
    ->. Keys are lower-cased. Raises InvalidArgument for a part that is not KEY=VALUE and for a
    key given twice.
    """
    parts = [part for part in _INLINE_SEPARATORS.split(text) if part]
    pairs = [part.partition("=") for part in parts]
    names = [value for key, sep, value in pairs if sep and key.strip().lower() == "name"]
    if len(names) != 1 or not _INLINE_NAME.fullmatch(names[0]):
        return None
    options: dict[str, str] = {}
    for part, (key, sep, value) in zip(parts, pairs, strict=True):
        key = key.strip().lower()
        if not sep or not key:
            raise errors.InvalidArgument(
                f"invalid inline volume spec {text!r}: {part!r} is not KEY=VALUE"
            )
        if key in options:
            raise errors.InvalidArgument(f"invalid inline volume spec {text!r}: {key} given twice")
        options[key] = value
    return options


def volume_name(docker_name: Any) -> str:
    """Return the pxd volume name of a Docker volume name, which may be an inline spec."""
    if not isinstance(docker_name, str):
        raise errors.InvalidArgument(f"Name must be a string, got {json.dumps(docker_name)}")
    inline = parse_inline(docker_name)
    name = inline["name"] if inline is not None else docker_name
    return units.validate_name(name)


def parse_create(docker_name: Any, opts: Any) -> CreateSpec:
    """Parse the Name and Opts of a Create request; raises InvalidArgument or NotSupported.

    An inline spec in the name wins and Opts is ignored, as openstorage does. Keys match
    case-insensitively: size (a bare number is GiB), repl (1 to 3), labels ("k1=v1,k2=v2"),
    nodes ("ID;ID", node ids or IPs), fs (only "fuse"), and every key that pxfs does not
    interpret becomes a volume label.
    """
    name = volume_name(docker_name)
    inline = parse_inline(docker_name)
    if inline is not None:
        if opts:
            log.info("volume %s: Opts ignored because the name contains the spec", name)
        options = {key: value for key, value in inline.items() if key != "name"}
    else:
        options = _check_opts(opts)
    spec = CreateSpec(name)
    labels: dict[str, str] = {}
    for key, value in options.items():
        _apply_option(spec, labels, key, value)
    spec.labels = units.validate_labels({**labels, **spec.labels})
    return spec


def _check_opts(opts: Any) -> dict[str, str]:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise errors.InvalidArgument("Opts must be a JSON object of strings")
    checked: dict[str, str] = {}
    for key, value in opts.items():
        if not isinstance(value, str):
            raise errors.InvalidArgument(f"option {key} must be a string, got {json.dumps(value)}")
        lowered = key.strip().lower()
        if lowered in checked:
            raise errors.InvalidArgument(f"option {lowered} given twice")
        checked[lowered] = value
    return checked


def _apply_option(spec: CreateSpec, labels: dict[str, str], key: str, value: str) -> None:
    """Apply one DriverOpts key to `spec`; keys without a meaning for pxfs go to `labels`."""
    if key == "size":
        spec.size = units.parse_size(value)
        spec.explicit = True
    elif key == "repl":
        spec.ha_level = _parse_repl(value)
        spec.explicit = True
    elif key == "labels":
        spec.labels.update(_parse_labels(value))
    elif key == "nodes":
        spec.nodes = _parse_nodes(value)
    elif key == "fs":
        if value.strip().lower() != "fuse":
            raise errors.NotSupported(
                f"option fs={value} is not supported: pxfs volumes are FUSE filesystems; "
                "leave fs out or set fs=fuse"
            )
    elif key == "name":
        if value != spec.name:
            raise errors.InvalidArgument(
                f"option name={value} does not match the volume name {spec.name}"
            )
    elif key in _FEATURE_FLAGS:
        if parse_bool(key, value):
            raise errors.NotSupported(
                f"option {key}={value} is not supported: pxfs has no {_FEATURE_FLAGS[key]}"
            )
    elif key in _UNSUPPORTED_VALUES:
        if value:
            raise errors.NotSupported(f"option {key} is not supported: {_UNSUPPORTED_VALUES[key]}")
    elif key not in _DROPPED:
        labels[key] = value


def _parse_repl(value: str) -> int:
    text = value.strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_HA_LEVEL:
        raise errors.InvalidArgument(
            f"invalid repl {value!r}: expected a replica count from 1 to {MAX_HA_LEVEL}"
        )
    return int(text)


def _parse_nodes(value: str) -> list[str] | None:
    """Parse nodes=ID;ID, the ids or IPs of the replica nodes; an empty value sets none."""
    nodes = [node.strip() for node in value.split(";") if node.strip()]
    return nodes or None


def _parse_labels(value: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, label = item.partition("=")
        if not sep or not key.strip():
            raise errors.InvalidArgument(
                f"invalid labels {value!r}: expected KEY=VALUE pairs separated by commas"
            )
        labels[key.strip()] = label.strip()
    return labels


def parse_bool(key: str, value: str) -> bool:
    """Parse a boolean option the way Go's strconv.ParseBool does."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE or not lowered:
        return False
    raise errors.InvalidArgument(f"invalid {key} {value!r}: expected true or false")
