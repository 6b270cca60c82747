"""The pxd-sidecar command line of daemon/sidecar.py: defaults from pxd.toml and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon import sidecar
from pxfs.api.server import ConnectionLimits

REPO = Path(__file__).resolve().parent.parent.parent


def write_config(tmp_path: Path, text: str) -> Path:
    """Write a pxd.toml with `text` under `tmp_path` and return its path."""
    path = tmp_path / "pxd.toml"
    path.write_text(text)
    return path


def test_state_dir_follows_data_dir(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'data_dir = "{tmp_path / "data"}"\n')
    args = sidecar.build_parser().parse_args(["--config", str(config)])
    settings = sidecar.resolve_settings(args)
    assert settings.state_dir == str(tmp_path / "data" / "sidecar")


def test_state_dir_flag_overrides(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'data_dir = "{tmp_path / "data"}"\n')
    argv = ["--config", str(config), "--state-dir", str(tmp_path / "elsewhere")]
    settings = sidecar.resolve_settings(sidecar.build_parser().parse_args(argv))
    assert settings.state_dir == str(tmp_path / "elsewhere")


def test_state_dir_default_without_config() -> None:
    args = sidecar.build_parser().parse_args(["--config", "/dev/null"])
    assert sidecar.resolve_settings(args).state_dir == "/var/lib/pxfs/sidecar"


def test_help_names_state_dir_default() -> None:
    text = " ".join(sidecar.build_parser().format_help().split())
    assert "default: DATA_DIR/sidecar, with data_dir of the configuration" in text


def test_bad_config_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path, "rest_port = 70000\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon.sidecar", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("pxd-sidecar: ")
    assert "rest_port must be a port number" in result.stderr
    assert "Traceback" not in result.stderr


def test_bounds_and_token_from_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    token.chmod(0o600)
    config = write_config(
        tmp_path,
        f'rest_token_file = "{token}"\nrest_max_connections = 7\n'
        "rest_max_connections_per_client = 3\nrest_max_requests = 5\n"
        "plugin_max_connections = 4\n",
    )
    settings = sidecar.resolve_settings(
        sidecar.build_parser().parse_args(["--config", str(config)])
    )
    assert settings.token is not None
    assert settings.token.matches("0123456789abcdef0123")
    assert settings.rest_limits == ConnectionLimits(7, 3)
    assert settings.max_requests == 5
    assert settings.plugin_limits == ConnectionLimits(4)


def test_defaults_without_config() -> None:
    settings = sidecar.resolve_settings(
        sidecar.build_parser().parse_args(["--config", "/dev/null"])
    )
    assert settings.token is None
    assert settings.rest_limits == ConnectionLimits(256, 32)
    assert settings.max_requests == 64
    assert settings.plugin_limits == ConnectionLimits(64)


def test_token_flag_overrides_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("fedcba9876543210fedc")
    token.chmod(0o600)
    config = write_config(tmp_path, f'rest_token_file = "{tmp_path / "missing"}"\n')
    argv = ["--config", str(config), "--rest-token-file", str(token), "--rest", "0.0.0.0:9"]
    settings = sidecar.resolve_settings(sidecar.build_parser().parse_args(argv))
    assert settings.host == "0.0.0.0"
    assert settings.token is not None
    assert settings.token.matches("fedcba9876543210fedc")
