#!/usr/bin/env bash
# Install what pxfs needs on Debian 12 and build its virtual environment; safe to run again.
#   tools/setup.sh          packages to run a node, and the venv with pxfs
#   tools/setup.sh --test   also what the test suite and benchmarks use
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${PXFS_VENV:-$repo/.venv}
run_packages=(fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc)
test_packages=(fio sqlite3 git util-linux e2fsprogs docker.io busybox-static etcd-server systemd
    glusterfs-server glusterfs-client)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and mounts FUSE filesystems)" >&2
    exit 1
fi

packages=("${run_packages[@]}")
extras="."
if [ "${1:-}" = "--test" ]; then
    packages+=("${test_packages[@]}")
    extras=".[test]"
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

# Debian's interpreter, so the venv matches what a fresh Debian 12 machine has.
python=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating the virtual environment $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -e "$repo${extras#.}"
echo "setup.sh: pxfs is installed in $venv"
