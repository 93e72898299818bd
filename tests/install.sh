#!/bin/sh
# Everything the test suite needs, on a fresh Debian/Ubuntu machine or in CI:
# - system tools: setpriv/unshare (util-linux: capability-dropped and private-mount-namespace
#   cases) and mksquashfs (squashfs-tools: evicting on a file system without fsync);
# - warmpool, editable, with the test extra (llama-cpp-python[server], ray, prometheus-client, ...).
# Installing system packages needs root and apt; elsewhere the cases that need a missing tool
# skip and print why.
set -eu
need=""
command -v setpriv >/dev/null 2>&1 || need="$need util-linux"
command -v mksquashfs >/dev/null 2>&1 || need="$need squashfs-tools"
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    else
        echo "tests/install.sh: not installing$need (needs root and apt); the cases that use them will skip" >&2
    fi
fi
pip install -e '.[test]'
