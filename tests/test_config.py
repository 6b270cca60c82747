"""The cluster keys of pxd.toml and their parsers in pxfs/config.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pxfs import errors
from pxfs.config import Config, load_config, parse_endpoints, parse_listen

REPO = Path(__file__).resolve().parent.parent


def test_listen_host_and_port() -> None:
    assert parse_listen("127.0.0.2:9100", 9002) == ("127.0.0.2", 9100)
    assert parse_listen("127.0.0.2", 9002) == ("127.0.0.2", 9002)


@pytest.mark.parametrize("value", ["", ":9002", "host:", "host:x", "host:0", "host:65536"])
def test_listen_invalid(value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="invalid listen address"):
        parse_listen(value, 9002)


def test_endpoints_from_string_and_list() -> None:
    expected = ("http://127.0.0.1:2379", "https://127.0.0.1:2380")
    assert parse_endpoints("http://127.0.0.1:2379, https://127.0.0.1:2380") == expected
    assert parse_endpoints(list(expected)) == expected


@pytest.mark.parametrize("value", ["127.0.0.1:2379", "ftp://x", ""])
def test_endpoints_invalid(value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="invalid etcd endpoint"):
        parse_endpoints(value)


def test_peer_address_default_and_listen() -> None:
    assert Config().peer_address == ("127.0.0.1", 9002)
    assert Config(node_ip="127.0.0.5", peer_port=9100).peer_address == ("127.0.0.5", 9100)
    assert Config(listen="127.0.0.6:9200").peer_address == ("127.0.0.6", 9200)


def test_config_file_cluster_keys(tmp_path: Path) -> None:
    path = tmp_path / "pxd.toml"
    path.write_text(
        'etcd_endpoints = ["http://127.0.0.1:2379"]\nlisten = "127.0.0.2:9100"\n'
        'cluster_id = "blue"\n'
    )
    config = load_config(path)
    assert config.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert config.peer_address == ("127.0.0.2", 9100)
    assert config.cluster_id == "blue"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('etcd_endpoints = "http://127.0.0.1:2379"', "etcd_endpoints must be a list of URLs"),
        ('etcd_endpoints = ["127.0.0.1:2379"]', "invalid etcd endpoint"),
        ("listen = 9002", "listen must be a string HOST:PORT"),
        ('listen = "host:x"', "invalid listen address"),
        ('node_ip = "999.1.1.1"', "node_ip must be an IP address"),
        ('node_ip = "node1"', "node_ip must be an IP address"),
    ],
)
def test_config_file_invalid_cluster_keys(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "pxd.toml"
    path.write_text(line + "\n")
    with pytest.raises(errors.InvalidArgument, match=message):
        load_config(path)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--etcd", "127.0.0.1:2379"], "invalid etcd endpoint"),
        (["--listen", "127.0.0.2:port"], "invalid listen address"),
    ],
)
def test_pxd_rejects_invalid_cluster_flags(tmp_path: Path, flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.pxd", "--data-dir", str(tmp_path / "data"),
         "--socket", str(tmp_path / "pxd.sock"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "data").exists()
