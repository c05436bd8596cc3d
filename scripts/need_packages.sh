#!/usr/bin/env bash
# The system's part of what the tests need, installed from Debian's packages where missing:
# Open MPI (mpicc, mpirun) and libclang for the `mpi` feature (rsmpi's generated bindings), and
# DejaVu Sans, the font `softprompt plot` writes its labels with.
set -euo pipefail
missing=()
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
    missing+=(libopenmpi-dev openmpi-bin)
fi
# bindgen loads libclang itself (libclang.so, libclang-N.so): libclang-cpp, which some images
# carry alone, is not it
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1; then
    missing+=(libclang-dev)
fi
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ -z "${SOFTPROMPT_FONT:-}" ]; then
    missing+=(fonts-dejavu-core)
fi
if [ ${#missing[@]} = 0 ]; then
    exit 0
fi
SUDO=$(command -v sudo || true)
if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
    echo "need: apt-get install ${missing[*]}" >&2
    exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
