#!/usr/bin/env bash
# What the `mpi` feature builds against and its tests run: Open MPI (mpicc, mpirun) and libclang
# for rsmpi's generated bindings. Installed from Debian's packages where missing.
set -euo pipefail
if command -v mpirun >/dev/null && command -v mpicc >/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
    exit 0
fi
SUDO=$(command -v sudo || true)
if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
    echo "need Open MPI and libclang: apt-get install libopenmpi-dev openmpi-bin libclang-dev" >&2
    exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
