"""Property and fuzz tests of the size parser and the name and label rules of pxfs.units.

Every accepted size must be a multiple of 64 KiB between MIN_VOLUME_SIZE and MAX_VOLUME_SIZE,
and every rejected input must raise InvalidArgument and nothing else. The name and label tests
check acceptance against a model written from the docstrings, in both directions.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pxfs import units
from pxfs.errors import InvalidArgument

# No example database, so a run leaves no files behind. The deadline catches a parser that loops.
FUZZ = settings(database=None, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    """Return the fuzz settings with `examples` inputs per run."""
    return settings(FUZZ, max_examples=examples)


SHIFTS = {"": 30, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
SIZE_ALPHABET = "0123456789.,+-eE_ \t\n kmgtpbiKMGTPBIx\u00a0\u0660\u212a"


def check_accepted_size(size: Any) -> None:
    """Assert the invariants of every size that parse_size returns."""
    assert isinstance(size, int)
    assert size % units.BLOCK_SIZE == 0
    assert units.MIN_VOLUME_SIZE <= size <= units.MAX_VOLUME_SIZE


def parse_or_none(text: Any) -> int | None:
    """Return parse_size(text), or None when it raises InvalidArgument."""
    try:
        return units.parse_size(text)
    except InvalidArgument:
        return None


@fuzz(400)
@given(st.text(max_size=80))
def test_parse_size_any_text(text: str) -> None:
    """400 arbitrary strings: a valid size or InvalidArgument."""
    size = parse_or_none(text)
    if size is not None:
        check_accepted_size(size)


@fuzz(400)
@given(st.text(alphabet=SIZE_ALPHABET, max_size=24))
def test_parse_size_size_like_text(text: str) -> None:
    """400 strings of digits, signs, spaces and suffix letters: a valid size or InvalidArgument."""
    size = parse_or_none(text)
    if size is not None:
        check_accepted_size(size)


@st.composite
def size_texts(draw: st.DrawFn) -> tuple[str, Fraction, int]:
    """Draw a well-formed size string with the exact number and shift it stands for."""
    whole = draw(st.integers(0, 10**7))
    fraction = draw(st.none() | st.text(alphabet="0123456789", max_size=6))
    if fraction is None:
        number = str(whole)
    elif whole == 0 and fraction and draw(st.booleans()):
        number = "." + fraction
    else:
        number = f"{whole}.{fraction}"
    letter = draw(st.sampled_from(list(SHIFTS)))
    suffix = letter
    if letter not in ("", "b"):
        suffix += draw(st.sampled_from(["", "b", "i", "ib"]))
    suffix = "".join(char.upper() if draw(st.booleans()) else char for char in suffix)
    space = draw(st.sampled_from(["", " ", "  ", "\t"])) if suffix else ""
    padding = draw(st.sampled_from(["", " ", "\n"]))
    return padding + number + space + suffix + padding, Fraction(number), SHIFTS[letter]


@fuzz(400)
@given(size_texts())
def test_parse_size_matches_model(case: tuple[str, Fraction, int]) -> None:
    """400 well-formed sizes: the exact value rounded up to 64 KiB, or InvalidArgument."""
    text, number, shift = case
    exact = number * (1 << shift)
    blocks = -(-exact // units.BLOCK_SIZE)
    expected = blocks * units.BLOCK_SIZE
    in_range = 0 < exact <= units.MAX_VOLUME_SIZE and expected >= units.MIN_VOLUME_SIZE
    size = parse_or_none(text)
    if in_range:
        assert size == expected
    else:
        assert size is None


@fuzz(300)
@given(
    st.none()
    | st.booleans()
    | st.floats()
    | st.binary(max_size=8)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
def test_parse_size_non_string(value: Any) -> None:
    """300 values that are not strings raise InvalidArgument."""
    with pytest.raises(InvalidArgument):
        units.parse_size(value)


@fuzz(400)
@given(st.integers() | st.booleans() | st.floats() | st.text(max_size=5) | st.none())
def test_check_size_any_value(value: Any) -> None:
    """400 values: a positive multiple of 64 KiB within the maximum, or InvalidArgument."""
    try:
        size = units.check_size(value)
    except InvalidArgument:
        valid = isinstance(value, int) and not isinstance(value, bool)
        assert not valid or value <= 0 or value > units.MAX_VOLUME_SIZE
        return
    assert isinstance(value, int)
    assert size % units.BLOCK_SIZE == 0
    assert 0 < size <= units.MAX_VOLUME_SIZE
    assert value <= size < value + units.BLOCK_SIZE


# --- names and labels ----------------------------------------------------------------------------


def name_is_valid(name: str) -> bool:
    """The rules of validate_name's docstring, written out independently."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (
        0 < len(encoded) <= units.MAX_NAME_BYTES
        and name not in (".", "..")
        and "/" not in name
        and all(char.isprintable() for char in name)
        and name == name.strip()
    )


# Names near the rules: dots, slashes, spaces, controls, format and separator characters.
NAME_ALPHABET = (
    st.sampled_from(list("ab./ \t\x00\x7f\u00a0\u200b\u2028\u3000\ufeffé")) | st.characters()
)
names = (
    st.text(max_size=20)
    | st.text(alphabet=NAME_ALPHABET, max_size=8)
    | st.text(alphabet="aé中", min_size=80, max_size=260)
)


@fuzz(600)
@given(names)
def test_validate_name_matches_rules(name: str) -> None:
    """600 names: accepted exactly when the documented rules hold, else InvalidArgument."""
    try:
        assert units.validate_name(name) == name
    except InvalidArgument:
        assert not name_is_valid(name)
        return
    assert name_is_valid(name)


@fuzz(200)
@given(st.none() | st.integers() | st.binary(max_size=8) | st.lists(st.text(max_size=3)))
def test_validate_name_non_string(value: Any) -> None:
    """200 values that are not strings raise InvalidArgument."""
    with pytest.raises(InvalidArgument):
        units.validate_name(value)


def label_key_is_valid(key: Any) -> bool:
    """The documented label key rules."""
    if not isinstance(key, str) or not key:
        return False
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    control = any(0 <= ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in key)
    return len(encoded) <= units.MAX_LABEL_KEY_BYTES and not control


def label_value_is_valid(value: Any) -> bool:
    """The documented label value rules."""
    if not isinstance(value, str):
        return False
    if any(0 <= ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value):
        return False
    try:
        return len(value.encode("utf-8")) <= units.MAX_LABEL_VALUE_BYTES
    except UnicodeEncodeError:
        return False


label_keys = st.text(max_size=6) | st.text(min_size=120, max_size=140) | st.integers(0, 3)
label_values = st.text(max_size=6) | st.text(min_size=1020, max_size=1030) | st.integers(0, 3)
label_maps = st.dictionaries(label_keys, label_values, max_size=4) | st.dictionaries(
    st.text(max_size=4), st.just("v"), min_size=60, max_size=70
)


@fuzz(100)
@given(label_maps)
def test_validate_labels_matches_rules(labels: dict[Any, Any]) -> None:
    """100 label maps: accepted exactly when every documented rule holds, else InvalidArgument."""
    valid = len(labels) <= units.MAX_LABELS and all(
        label_key_is_valid(key) and label_value_is_valid(value) for key, value in labels.items()
    )
    try:
        checked = units.validate_labels(labels)
    except InvalidArgument:
        assert not valid
        return
    assert valid
    assert checked == labels
    assert checked is not labels
