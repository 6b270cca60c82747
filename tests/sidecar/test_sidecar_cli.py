"""The pxd-sidecar command line of daemon/sidecar.py: defaults from pxd.toml and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon import sidecar

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
