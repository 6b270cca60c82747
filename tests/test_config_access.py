"""The REST token, socket group, connection bound and volume bound keys of pxd.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from pxfs import errors
from pxfs.config import Config, load_config

BOUNDS = (
    "max_volumes",
    "control_max_connections",
    "rest_max_connections",
    "rest_max_connections_per_client",
    "rest_max_requests",
    "plugin_max_connections",
)


def load(tmp_path: Path, text: str) -> Config:
    """Load a pxd.toml that contains `text`."""
    path = tmp_path / "pxd.toml"
    path.write_text(text)
    return load_config(path)


def test_defaults() -> None:
    config = Config()
    assert config.rest_token_file is None
    assert config.max_volumes == 1024
    assert config.control_max_connections == 64
    assert config.rest_max_connections == 256
    assert config.rest_max_connections_per_client == 32
    assert config.rest_max_requests == 64
    assert config.plugin_max_connections == 64


@pytest.mark.parametrize("key", BOUNDS)
def test_bound_from_file(tmp_path: Path, key: str) -> None:
    assert getattr(load(tmp_path, f"{key} = 1\n"), key) == 1
    assert getattr(load(tmp_path, f"{key} = 100000\n"), key) == 100000


@pytest.mark.parametrize("key", BOUNDS)
@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", '"8"', "[]"])
def test_bound_invalid(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"{key} must be a whole number from 1"):
        load(tmp_path, f"{key} = {value}\n")


def test_token_file_from_file(tmp_path: Path) -> None:
    assert load(tmp_path, 'rest_token_file = "/etc/pxfs/rest.token"\n').rest_token_file == Path(
        "/etc/pxfs/rest.token"
    )
    assert load(tmp_path, 'rest_token_file = ""\n').rest_token_file is None


@pytest.mark.parametrize("value", ['"rest.token"', "1", "true", '"./x"'])
def test_token_file_invalid(tmp_path: Path, value: str) -> None:
    with pytest.raises(
        errors.InvalidArgument, match='rest_token_file must be an absolute path or ""'
    ):
        load(tmp_path, f"rest_token_file = {value}\n")


def test_socket_group_default_is_root_only() -> None:
    config = Config()
    assert config.socket_group == ""
    assert config.socket_mode == 0o600
    assert config.socket_gid() is None


@pytest.mark.parametrize(("value", "gid"), [('"0"', 0), ('"root"', 0), ('"4242"', 4242)])
def test_socket_group_from_file(tmp_path: Path, value: str, gid: int) -> None:
    config = load(tmp_path, f"socket_group = {value}\n")
    assert config.socket_mode == 0o660
    assert config.socket_gid() == gid


@pytest.mark.parametrize("value", ["4242", "true", "[]"])
def test_socket_group_wrong_type(tmp_path: Path, value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="socket_group must be a group name or gid"):
        load(tmp_path, f"socket_group = {value}\n")


def test_socket_group_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="is not a group of this host"):
        load(tmp_path, 'socket_group = "no-such-group-pxfs"\n')
