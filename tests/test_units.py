"""Size parsing, name and label validation."""

import pytest

from pxfs.errors import InvalidArgument
from pxfs.units import (
    BLOCK_SIZE,
    MAX_VOLUME_SIZE,
    MIN_VOLUME_SIZE,
    check_size,
    escape_control,
    format_size,
    parse_size,
    validate_labels,
    validate_name,
)
from pxfs.volume.format import MIN_DATA_BLOCKS

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("14", 14 * GIB),
        ("1", GIB),
        ("10G", 10 * GIB),
        ("10g", 10 * GIB),
        ("10GB", 10 * GIB),
        ("10gb", 10 * GIB),
        ("10GiB", 10 * GIB),
        ("10Gi", 10 * GIB),
        ("10 G", 10 * GIB),
        ("  10 GiB  ", 10 * GIB),
        ("512MiB", 512 * MIB),
        ("512M", 512 * MIB),
        ("512mb", 512 * MIB),
        ("1024K", MIB),
        ("1024KB", MIB),
        ("1024kib", MIB),
        ("1048576B", MIB),
        ("1048576b", MIB),
        ("1T", TIB),
        ("1TiB", TIB),
        ("1.5G", 3 * GIB // 2),
        ("0.5", GIB // 2),
        (".5G", GIB // 2),
        ("1.", GIB),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048577B", 17 * BLOCK_SIZE),
        ("1025K", 17 * BLOCK_SIZE),
        ("1.00001M", 17 * BLOCK_SIZE),
        ("1023K", MIN_VOLUME_SIZE),
        ("983041B", MIN_VOLUME_SIZE),
    ],
)
def test_parse_size_rounds_up_to_block(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0", "invalid size '0': below the minimum volume size of 1 MiB"),
        ("0G", "invalid size '0G': below the minimum volume size of 1 MiB"),
        ("0.0", "invalid size '0.0': below the minimum"),
        ("1K", "invalid size '1K': below the minimum volume size of 1 MiB"),
        ("1B", "invalid size '1B': below the minimum"),
        ("983040B", "invalid size '983040B': below the minimum"),
        ("-1", "expected a number"),
        ("-1G", "expected a number"),
        ("", "expected a number"),
        ("   ", "expected a number"),
        ("G", "expected a number"),
        ("ten", "expected a number"),
        ("10X", "unknown suffix"),
        ("10 GG", "unknown suffix"),
        ("10E", "unknown suffix"),
        ("1e3", "expected a number"),
        ("1,5G", "expected a number"),
        ("1P", "maximum volume size"),
        ("1025G", "maximum volume size"),
        ("2T", "maximum volume size"),
        ("1099511627777B", "maximum volume size"),
        ("9" * 40, "maximum volume size"),
        ("9" * 5000, "too long"),
        ("1\x00G", "expected a number"),
    ],
)
def test_parse_size_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        parse_size(text)


def test_parse_size_max_is_allowed() -> None:
    assert parse_size("1024G") == MAX_VOLUME_SIZE


def test_min_size_matches_format() -> None:
    # A size that parse_size accepts must be one that pxd can format.
    assert MIN_VOLUME_SIZE == MIN_DATA_BLOCKS * BLOCK_SIZE


def test_parse_size_min_is_allowed() -> None:
    assert parse_size("1M") == MIN_VOLUME_SIZE
    assert parse_size("1048576B") == MIN_VOLUME_SIZE


@pytest.mark.parametrize("value", [14, None, 1.5, b"10G", True])
def test_parse_size_rejects_non_string(value: object) -> None:
    with pytest.raises(InvalidArgument, match="must be a string"):
        parse_size(value)  # type: ignore[arg-type]


def test_check_size_rounds_bytes() -> None:
    assert check_size(1) == BLOCK_SIZE
    assert check_size(BLOCK_SIZE) == BLOCK_SIZE
    assert check_size(BLOCK_SIZE + 1) == 2 * BLOCK_SIZE
    assert check_size(MAX_VOLUME_SIZE) == MAX_VOLUME_SIZE


@pytest.mark.parametrize("value", [0, -1, MAX_VOLUME_SIZE + 1, True, 1.0, "1G", None])
def test_check_size_rejects(value: object) -> None:
    with pytest.raises(InvalidArgument):
        check_size(value)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(64 * KIB) == "64.0 KiB"
    assert format_size(GIB) == "1.0 GiB"
    assert format_size(3 * GIB // 2) == "1.5 GiB"
    assert format_size(TIB) == "1.0 TiB"


@pytest.mark.parametrize(
    "name",
    ["vol1", "a", "my-vol_2.data", "x" * 255, "é" * 127, "name with spaces", "...", "日本語"],
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        (".", "reserved"),
        ("..", "reserved"),
        ("a/b", "contains '/'"),
        ("/", "contains '/'"),
        ("a\x00b", "U\\+0000"),
        ("a\nb", "U\\+000A"),
        ("tab\there", "U\\+0009"),
        ("del\x7f", "U\\+007F"),
        ("c1\x85", "U\\+0085"),
        ("x" * 256, "256 bytes"),
        ("é" * 128, "256 bytes"),
        ("bad\udcffsurrogate", "not valid UTF-8"),
        ("line\u2028sep", "non-printable character U\\+2028"),
        ("para\u2029sep", "non-printable character U\\+2029"),
        ("zero\u200bwidth", "non-printable character U\\+200B"),
        ("bidi\u202eorder", "non-printable character U\\+202E"),
        ("no\u00a0break", "non-printable character U\\+00A0"),
        (" lead", "starts or ends with whitespace"),
        ("trail ", "starts or ends with whitespace"),
        (" ", "starts or ends with whitespace"),
    ],
)
def test_validate_name_rejects(name: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        validate_name(name)


@pytest.mark.parametrize("name", [None, 5, b"vol", ["vol"]])
def test_validate_name_rejects_non_string(name: object) -> None:
    with pytest.raises(InvalidArgument, match="must be a string"):
        validate_name(name)


def test_validate_labels_accepts() -> None:
    assert validate_labels(None) == {}
    assert validate_labels({}) == {}
    labels = {"app": "db", "tier": "", "k" * 128: "v" * 1024}
    checked = validate_labels(labels)
    assert checked == labels
    assert checked is not labels


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        (["app=db"], "map of strings"),
        ("app=db", "map of strings"),
        ({"": "x"}, "non-empty strings"),
        ({1: "x"}, "non-empty strings"),
        ({"app": 1}, "values are strings"),
        ({"app": None}, "values are strings"),
        ({"k" * 129: "x"}, "128 bytes"),
        ({"app": "v" * 1025}, "1024 bytes"),
        ({"a\nb": "x"}, "control character"),
        ({"k": "a\x00b"}, "control character U\\+0000"),
        ({"k": "a\nb"}, "control character U\\+000A"),
        ({"k": "\x1b[31m"}, "control character U\\+001B"),
        ({"k": "\x7f"}, "control character U\\+007F"),
        ({"k": "x\x85"}, "control character U\\+0085"),
        ({f"k{i}": "v" for i in range(65)}, "maximum is 64"),
    ],
)
def test_validate_labels_rejects(labels: object, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        validate_labels(labels)


def test_escape_control_characters() -> None:
    assert escape_control("plain ü text") == "plain ü text"
    assert escape_control("a\x00b\nc") == "a\\x00b\\nc"
    assert escape_control("\x1b[31m") == "\\x1b[31m"
    assert escape_control("\t\x85") == "\\t\\x85"
