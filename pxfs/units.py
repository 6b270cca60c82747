"""Volume sizes, names and labels: parsing and validation of what users type.

Sizes follow the openstorage units rules. The suffixes B, K/KB/KiB, M, G, T and P may be in any
case and are all binary (1 KB is 1024 bytes). A space may come before the suffix, and a bare
number means GiB, so "14" is 14 GiB. Unlike openstorage, which drops a fractional part ("1.5G"
becomes 1 GiB), pxfs keeps it: "1.5G" is 1.5 GiB. Every size is rounded up to a whole 64 KiB
block.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from pxfs.errors import InvalidArgument

BLOCK_SIZE = 64 * 1024
MAX_VOLUME_SIZE = 1 << 40
#: The smallest volume pxd formats: 16 data blocks, the MIN_DATA_BLOCKS of pxfs.volume.format.
MIN_VOLUME_SIZE = 16 * BLOCK_SIZE
MAX_NAME_BYTES = 255
MAX_LABELS = 64
MAX_LABEL_KEY_BYTES = 128
MAX_LABEL_VALUE_BYTES = 1024
#: Longer size strings are rejected before any arithmetic, so that a million digits cost nothing.
_MAX_SIZE_TEXT = 64

_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SHIFTS = {"": 30, "b": 0}
for _shift, _letter in enumerate("kmgtp", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "i", _letter + "ib"):
        _SHIFTS[_suffix] = 10 * _shift


def parse_size(text: str) -> int:
    """Parse a size such as "14", "10G" or "512 MiB" into bytes, rounded up to 64 KiB.

    Raises InvalidArgument for an empty, negative or malformed size, an unknown suffix, and a
    size below MIN_VOLUME_SIZE or above MAX_VOLUME_SIZE.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"size must be a string such as '10G', not {type(text).__name__}")
    stripped = text.strip()
    if len(stripped) > _MAX_SIZE_TEXT:
        raise InvalidArgument(f"invalid size {stripped[:_MAX_SIZE_TEXT]!r}...: too long")
    match = _SIZE_RE.fullmatch(stripped.lower())
    if match is None:
        raise InvalidArgument(
            f"invalid size {text!r}: expected a number with an optional suffix B, K, M, G, T or P"
        )
    number, suffix = match.groups()
    shift = _SHIFTS.get(suffix)
    if shift is None:
        raise InvalidArgument(f"invalid size {text!r}: unknown suffix {suffix!r}")
    exact = Fraction(number) * (1 << shift)
    if exact > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"invalid size {text!r}: the maximum volume size is 1 TiB")
    size = check_size(-(-exact // 1)) if exact > 0 else 0
    # Checked here rather than by pxd, so that the message quotes the size the user typed and
    # not the rounded byte count.
    if size < MIN_VOLUME_SIZE:
        raise InvalidArgument(
            f"invalid size {text!r}: below the minimum volume size of 1 MiB "
            f"({MIN_VOLUME_SIZE} bytes)"
        )
    return size


def check_size(nbytes: Any) -> int:
    """Validate a size in bytes and return it rounded up to a whole 64 KiB block."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise InvalidArgument(f"size must be an integer number of bytes, not {nbytes!r}")
    if nbytes <= 0:
        raise InvalidArgument(f"invalid size {nbytes}: a volume needs at least one byte")
    if nbytes > MAX_VOLUME_SIZE:
        raise InvalidArgument(
            f"invalid size {nbytes} bytes: the maximum volume size is {MAX_VOLUME_SIZE} (1 TiB)"
        )
    return -(-nbytes // BLOCK_SIZE) * BLOCK_SIZE


def format_size(nbytes: int) -> str:
    """Format a byte count the way pxctl prints sizes, such as "1.0 GiB" or "64 KiB"."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def escape_control(text: str) -> str:
    """Return `text` with each control character (category Cc) written as a Python escape."""
    if _control_character(text) is None:
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) == "Cc"
        else char
        for char in text
    )


def _control_character(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) == "Cc":
            return char
    return None


def _utf8(text: str, kind: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"invalid {kind} {text!r}: not valid UTF-8") from None


def validate_name(name: Any) -> str:
    """Return `name` if it is a valid volume name, else raise InvalidArgument with the reason.

    A name is 1 to 255 bytes of UTF-8 without "/" and without characters that str.isprintable
    rejects (control, format and separator characters other than the space), does not start
    or end with whitespace, and is not "." or "..", because the Docker plugin uses it as a path
    component.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"volume name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidArgument("invalid volume name: the name is empty")
    encoded = _utf8(name, "volume name")
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"invalid volume name {name[:40]!r}...: {len(encoded)} bytes, the maximum is "
            f"{MAX_NAME_BYTES}"
        )
    if name in (".", ".."):
        raise InvalidArgument(f"invalid volume name {name!r}: '.' and '..' are reserved")
    if "/" in name:
        raise InvalidArgument(f"invalid volume name {name!r}: it contains '/'")
    control = _control_character(name)
    if control is not None:
        raise InvalidArgument(
            f"invalid volume name {name!r}: it contains the control character U+{ord(control):04X}"
        )
    # Separators such as U+2028 break the lines of `pxctl volume list`, and invisible format
    # characters make two different names look alike.
    hidden = next((char for char in name if not char.isprintable()), None)
    if hidden is not None:
        raise InvalidArgument(
            f"invalid volume name {name!r}: it contains the non-printable character "
            f"U+{ord(hidden):04X}"
        )
    if name != name.strip():
        raise InvalidArgument(f"invalid volume name {name!r}: it starts or ends with whitespace")
    return name


def validate_labels(labels: Any) -> dict[str, str]:
    """Return a copy of `labels` if it is a valid label map, else raise InvalidArgument.

    Keys are 1 to 128 bytes and values at most 1024 bytes, both without control characters
    (Unicode category Cc, which includes NUL, newline and ESC), and a volume has at most 64
    labels.
    """
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidArgument(f"labels must be a map of strings, not {type(labels).__name__}")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels given, the maximum is {MAX_LABELS}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        _validate_label_key(key)
        _validate_label_value(key, value)
        checked[key] = value
    return checked


def _validate_label_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"invalid label key {key!r}: keys are non-empty strings")
    if len(_utf8(key, "label key")) > MAX_LABEL_KEY_BYTES:
        raise InvalidArgument(
            f"invalid label key {key[:40]!r}...: the maximum is {MAX_LABEL_KEY_BYTES} bytes"
        )
    if _control_character(key) is not None:
        raise InvalidArgument(f"invalid label key {key!r}: it contains a control character")


def _validate_label_value(key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"invalid value for label {key!r}: values are strings")
    if len(_utf8(value, "label value")) > MAX_LABEL_VALUE_BYTES:
        raise InvalidArgument(
            f"invalid value for label {key!r}: the maximum is {MAX_LABEL_VALUE_BYTES} bytes"
        )
    # A newline would break pxctl's aligned output, and ESC would reach the terminal of whoever
    # lists the labels.
    control = _control_character(value)
    if control is not None:
        raise InvalidArgument(
            f"invalid value {value[:40]!r} for label {key!r}: it contains the control character "
            f"U+{ord(control):04X}"
        )
