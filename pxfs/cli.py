"""pxctl: the operator's command-line tool, with Portworx-style verbs, calling the local pxd.

pxctl talks to pxd over its control socket: --socket, else $PXFS_SOCKET, else
/run/pxfs/pxd.sock. A failure prints one line `pxctl: <message>` on stderr and exits with the
exit code of the error's class in pxfs.errors (9 when pxd is not running).

This module is the entry point. pxfs.cliparser builds the parser of the verbs, pxfs.clicommands
contains their handlers and pxfs.cliformat the text that they print.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pxfs import errors
from pxfs.blockingclient import BlockingClient
from pxfs.clicommands import Command
from pxfs.cliparser import SOCKET_ENV, build_parser
from pxfs.config import Config


def socket_path(args: argparse.Namespace) -> str:
    """Return the control socket to use: --socket, else $PXFS_SOCKET, else the default."""
    return args.socket or os.environ.get(SOCKET_ENV) or str(Config().control_socket)


def main(argv: Sequence[str] | None = None) -> int:
    """Run pxctl and return its exit code."""
    args = build_parser().parse_args(argv)
    command: Command = args.func
    try:
        with BlockingClient(socket_path(args)) as client:
            return command(client, args)
    except errors.PxfsError as exc:
        print(f"pxctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pxctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`pxctl volume list | head`); Python would print a
        # traceback when it flushes stdout at exit unless stdout points elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
