"""Paths, addresses and defaults of a pxfs node, and loading of /etc/pxfs/pxd.toml.

Every key of the configuration file is optional and overrides the default of the same name:

    data_dir = "/var/lib/pxfs"
    max_volumes = 1024                       # volumes with a replica on this node, at most
    control_socket = "/run/pxfs/pxd.sock"
    control_max_connections = 64             # open connections to the control socket
    socket_group = ""                        # group of the control and plugin sockets (0660)
    peer_socket = "/run/pxfs/peer.sock"      # default: peer.sock next to control_socket
    rest_host = "127.0.0.1"
    rest_port = 9001
    rest_token_file = ""                     # bearer token of the REST API; "": none
    rest_max_connections = 256               # open REST connections, all clients
    rest_max_connections_per_client = 32     # open REST connections from one address
    rest_max_requests = 64                   # REST requests in flight; more get 503
    plugin_socket = "/run/docker/plugins/pxd.sock"
    plugin_max_connections = 64              # open connections to the plugin socket
    peer_port = 9002
    docker_mount_base = "/var/lib/osd/mounts"
    node_ip = "127.0.0.1"
    etcd_endpoints = []                      # e.g. ["http://127.0.0.1:2379"]; empty: local
    listen = ""                              # peer RPC over TCP; default node_ip:peer_port
    cluster_id = "default"
    scrub_interval_seconds = 604800          # periodic scrub of each volume; 0 turns it off
    scrub_rate_mib = 4                       # MiB/s that the periodic scrub reads, at most
    ssl = false                              # mutual TLS on the peer RPC over TCP
    ssl_cert = "/etc/pxfs/tls/node.crt"      # this node's certificate (PEM), used with ssl
    ssl_key = "/etc/pxfs/tls/node.key"       # its private key (PEM, no passphrase)
    ssl_ca = "/etc/pxfs/tls/ca.crt"          # the CA that signed every node's certificate

Command-line flags override the file in turn.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxfs.errors import InvalidArgument, PermissionDenied

log = logging.getLogger(__name__)

CONFIG_FILE = Path("/etc/pxfs/pxd.toml")


@dataclass(frozen=True)
class Config:
    """The settings of one node; `peer_socket` None means peer.sock next to `control_socket`."""

    data_dir: Path = Path("/var/lib/pxfs")
    #: Volumes with a replica on one node, at most; a create beyond it raises NoSpace.
    max_volumes: int = 1024
    control_socket: Path = Path("/run/pxfs/pxd.sock")
    #: Connections that pxd serves on the control socket at once; more are closed at once.
    control_max_connections: int = 64
    #: The group (name or number) that may use the control and plugin sockets, which then get
    #: mode 0660 instead of 0600. Empty: only root.
    socket_group: str = ""
    peer_socket: Path | None = None
    rest_host: str = "127.0.0.1"
    rest_port: int = 9001
    #: File of the REST API's bearer token, mode 0600. None: no token, which only a
    #: loopback rest_host allows.
    rest_token_file: Path | None = None
    #: Open REST connections, in total and from one client address, and REST requests in
    #: flight. A connection over a bound is closed at once; a request over it gets 503.
    rest_max_connections: int = 256
    rest_max_connections_per_client: int = 32
    rest_max_requests: int = 64
    plugin_socket: Path = Path("/run/docker/plugins/pxd.sock")
    #: Connections to the plugin socket at once; more are closed at once.
    plugin_max_connections: int = 64
    peer_port: int = 9002
    docker_mount_base: Path = Path("/var/lib/osd/mounts")
    # The address that node.status and the REST API report for this node.
    node_ip: str = "127.0.0.1"
    #: The etcd client URLs of the cluster's catalog. Empty: the single-node LocalCatalog.
    etcd_endpoints: tuple[str, ...] = ()
    #: HOST:PORT (or HOST) of the peer RPC over TCP, served only with etcd_endpoints. Empty:
    #: node_ip and peer_port.
    listen: str = ""
    #: The name under which the cluster's keys live in etcd, so clusters can share one etcd.
    cluster_id: str = "default"
    #: Seconds between two periodic scrubs of a volume (7 days); 0 turns the periodic scrub off.
    scrub_interval_seconds: float = 604800.0
    #: MiB per second that the periodic scrub reads, summed over a volume's replicas.
    scrub_rate_mib: float = 4.0
    #: Mutual TLS on the peer RPC over TCP, with the three files below (pxfs/tls.py).
    ssl: bool = False
    ssl_cert: Path = Path("/etc/pxfs/tls/node.crt")
    ssl_key: Path = Path("/etc/pxfs/tls/node.key")
    ssl_ca: Path = Path("/etc/pxfs/tls/ca.crt")

    @property
    def peer_socket_path(self) -> Path:
        """The peer RPC socket: the configured one, or peer.sock beside the control socket."""
        if self.peer_socket is not None:
            return self.peer_socket
        return self.control_socket.parent / "peer.sock"

    @property
    def peer_address(self) -> tuple[str, int]:
        """The host and port of the peer RPC over TCP: `listen`, or node_ip and peer_port."""
        if not self.listen:
            return self.node_ip, self.peer_port
        return parse_listen(self.listen, self.peer_port)

    @property
    def socket_mode(self) -> int:
        """The mode of the control and plugin sockets: 0660 with a socket_group, else 0600."""
        return 0o660 if self.socket_group else 0o600

    def socket_gid(self) -> int | None:
        """Return the gid of socket_group, None without one; raises InvalidArgument."""
        return resolve_group(self.socket_group) if self.socket_group else None

    def replace(self, **changes: Any) -> Config:
        """Return a copy with the given fields changed; None values are ignored."""
        overrides = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, **overrides)


_FIELDS = {field.name: field for field in dataclasses.fields(Config)}
_PATH_KEYS = {"data_dir", "control_socket", "peer_socket", "plugin_socket", "docker_mount_base"}
_PATH_KEYS |= {"ssl_cert", "ssl_key", "ssl_ca"}
_PORT_KEYS = {"rest_port", "peer_port"}
_NUMBER_KEYS = {"scrub_interval_seconds", "scrub_rate_mib"}
_COUNT_KEYS = {
    "max_volumes", "control_max_connections", "rest_max_connections",
    "rest_max_connections_per_client", "rest_max_requests", "plugin_max_connections",
}  # fmt: skip
_ENDPOINT_PREFIXES = ("http://", "https://")


def parse_listen(value: str, default_port: int) -> tuple[str, int]:
    """Split HOST:PORT, or a bare HOST with `default_port`; raises InvalidArgument."""
    host, colon, port_text = value.rpartition(":")
    if not colon:
        host, port_text = value, str(default_port)
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument(f"invalid listen address {value!r}: expected HOST:PORT")
    return host, int(port_text)


def resolve_group(group: str) -> int:
    """Return the gid of a group name or number; raises InvalidArgument for an unknown one."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(
            f"socket_group {group!r} is not a group of this host; create it or give a gid"
        ) from None


def parse_endpoints(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Return etcd client URLs from a comma-separated string or a list; raises InvalidArgument."""
    items = value.split(",") if isinstance(value, str) else list(value)
    endpoints = []
    for item in items:
        if not isinstance(item, str) or not item.strip().startswith(_ENDPOINT_PREFIXES):
            raise InvalidArgument(
                f"invalid etcd endpoint {item!r}: expected a URL such as http://127.0.0.1:2379"
            )
        endpoints.append(item.strip())
    return tuple(endpoints)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration file over the defaults.

    With `path` None the default file is read if it exists. An explicit path must exist.
    Raises InvalidArgument for a missing explicit file, bad TOML, an unknown key or a value of
    the wrong type.
    """
    explicit = path is not None
    file = Path(path) if path is not None else CONFIG_FILE
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise InvalidArgument(f"configuration file {file} does not exist") from None
        return Config()
    except PermissionError:
        raise PermissionDenied(f"configuration file {file} is not readable") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"configuration file {file} is not valid TOML: {exc}") from None
    config = Config(**{key: _convert(file, key, value) for key, value in data.items()})
    log.debug("loaded configuration from %s", file)
    return config


def _convert(file: Path, key: str, value: Any) -> Any:
    if key not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise InvalidArgument(f"{file}: unknown key {key!r}; the known keys are {known}")
    if key == "rest_token_file":
        # TOML has no null, so "" stands for no token file.
        if value == "":
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise InvalidArgument(f'{file}: {key} must be an absolute path or "", not {value!r}')
        return Path(value)
    if key in _COUNT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{file}: {key} must be a whole number from 1, not {value!r}")
        return value
    if key in _PATH_KEYS:
        if not isinstance(value, str) or not value.startswith("/"):
            raise InvalidArgument(f"{file}: {key} must be an absolute path, not {value!r}")
        return Path(value)
    if key in _PORT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise InvalidArgument(f"{file}: {key} must be a port number 1-65535, not {value!r}")
        return value
    if key == "etcd_endpoints":
        if not isinstance(value, list):
            raise InvalidArgument(f"{file}: {key} must be a list of URLs, not {value!r}")
        return _with_file(file, key, parse_endpoints, value)
    if key == "listen":
        if not isinstance(value, str):
            raise InvalidArgument(f"{file}: {key} must be a string HOST:PORT, not {value!r}")
        if value:
            _with_file(file, key, parse_listen, value, 9002)
        return value
    if key in _NUMBER_KEYS:
        return _check_number(file, key, value)
    if key == "ssl":
        if not isinstance(value, bool):
            raise InvalidArgument(f"{file}: {key} must be true or false, not {value!r}")
        return value
    if key == "socket_group":
        if not isinstance(value, str):
            raise InvalidArgument(f"{file}: {key} must be a group name or gid, not {value!r}")
        if value:
            _with_file(file, key, resolve_group, value)
        return value
    if key == "node_ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise InvalidArgument(f"{file}: {key} must be an IP address, not {value!r}") from None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{file}: {key} must be a non-empty string, not {value!r}")
    return value


def _check_number(file: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{file}: {key} must be a number, not {value!r}")
    if key == "scrub_interval_seconds" and not value >= 0:
        raise InvalidArgument(f"{file}: {key} must be 0 (off) or more seconds, not {value!r}")
    if key == "scrub_rate_mib" and not value > 0:
        raise InvalidArgument(f"{file}: {key} must be more than 0 MiB/s, not {value!r}")
    return float(value)


def _with_file(file: Path, key: str, parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{file}: {key}: {exc.message}") from None
