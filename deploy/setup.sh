#!/usr/bin/env bash
# Set up llm-supervisor from this checkout on a fresh Debian machine, as root: the system packages it
# builds against (llama-cpp-python compiles llama.cpp; systemd-python needs libsystemd), then a virtual
# environment in .venv with the project and its test tools. Safe to run again: it installs only what is
# missing, and pip's wheel cache turns the ~4-minute llama.cpp build into seconds the second time.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: systemd-analyze, sysusers, tmpfiles and journald, which the tests run (not as PID 1).
packages=(build-essential cmake pkg-config libsystemd-dev git systemd)
# A python3 that already makes virtual environments (pyenv, a newer build) is as good as Debian's.
if ! { python3 -m venv --help >/dev/null 2>&1 &&
       python3 -c 'import sysconfig, os; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null; }; then
    packages+=(python3 python3-venv python3-dev)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o=Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python 3.11 or newer is needed" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CMAKE_BUILD_PARALLEL_LEVEL: build llama.cpp on every core rather than cmake's default. CMAKE_ARGS from
# the environment reaches llama.cpp's build (CMAKE_ARGS=-DGGML_CUDA=on for NVIDIA GPUs, as the container
# image's CUDA flavour does); SETUP_EXTRAS= (empty) leaves out the test tools.
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip install -q -e ".[${SETUP_EXTRAS-test}]"
echo "setup: ready — .venv/bin/llm-supervisord, .venv/bin/llmctl" >&2
