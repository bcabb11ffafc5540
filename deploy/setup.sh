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

# llama.cpp is built for a CPU level, not for the build machine (GGML_NATIVE): a build for "this CPU"
# trusts its CPUID flags, which a VM may advertise without enabling (AMX here: every quantized model died
# of SIGILL), and the container image runs on other machines than the one that built it. LLAMA_CPU picks
# the level (README, 'CPU support'); CMAKE_ARGS from the environment is added (CMAKE_ARGS=-DGGML_CUDA=on
# for NVIDIA GPUs, as the container image's CUDA flavour does).
# Every family spelled out: with GGML_NATIVE off, ggml turns the AVX2 set on unless told otherwise.
x86_v3="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON -DGGML_BMI2=ON"
x86_v2="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=OFF -DGGML_F16C=OFF -DGGML_FMA=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF"
case "$(uname -m)/${LLAMA_CPU:=default}" in
    x86_64/default|x86_64/x86-64-v3) cpu_args="$x86_v3" ;;                       # Haswell, Zen 1 and later
    x86_64/x86-64-v2) cpu_args="$x86_v2" ;;                                      # any x86-64 since 2009
    x86_64/x86-64-v4) cpu_args="$x86_v3 -DGGML_AVX512=ON" ;;                     # AVX-512: Skylake-SP, Zen 4
    */default) cpu_args="-DGGML_NATIVE=OFF" ;;                                   # the architecture's baseline
    */native) cpu_args="-DGGML_NATIVE=ON" ;;                                     # this machine only
    *) echo "setup: LLAMA_CPU=$LLAMA_CPU is not known on $(uname -m)" >&2; exit 2 ;;
esac
build_args="$cpu_args ${CMAKE_ARGS:-}"
# pip's own wheel cache keys on the package, not on CMAKE_ARGS: a changed flag would silently reinstall
# the old build. Ours keys on everything that makes the build.
llama=$(grep -o 'llama-cpp-python==[^"]*' pyproject.toml)
# The wheel is py3-none (llama-cpp-python reaches libllama through ctypes): any Python 3 shares it.
key=$(printf '%s\n' "$llama" "$build_args" "$(uname -m)" | sha256sum | cut -c1-16)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/llm-supervisor/wheels/$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building $llama ($build_args; about 5 minutes on 2 cores)" >&2
    rm -rf "$wheels.tmp"
    # CMAKE_BUILD_PARALLEL_LEVEL: every core rather than cmake's default.
    CMAKE_ARGS="$build_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python "$llama" -w "$wheels.tmp"
    mv "$wheels.tmp" "$wheels"
fi
if [ "$(cat .venv/llama-cpp-build 2>/dev/null)" != "$key" ]; then
    .venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
    echo "$key" > .venv/llama-cpp-build
fi
# SETUP_EXTRAS= (empty) leaves out the test tools.
extras="${SETUP_EXTRAS-test}"
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# Proof rather than flags: a generated model, quantized as real GGUFs are, loads and generates here.
# SETUP_CHECK_BUILD=0 skips it where the build cannot run (a CUDA image built without a driver: the
# nodes check it instead, in the DaemonSet's init container).
if [ "${SETUP_CHECK_BUILD:-1}" != 0 ]; then
    .venv/bin/llm-supervisord --check-build >&2 || {
        echo "setup: this llama.cpp build does not run on this machine (above); try LLAMA_CPU=x86-64-v2" >&2; exit 1; }
fi
echo "setup: ready — .venv/bin/llm-supervisord, .venv/bin/llmctl" >&2
