"""Entry point of the mount child: python -m daemon.mount --help."""

import sys

from pxfs.mount import main

if __name__ == "__main__":
    sys.exit(main())
