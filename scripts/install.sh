#!/usr/bin/env bash
# Installs vitlab (and, with --test, its test extras) into the current Python. Where that Python is
# "externally managed" (PEP 668: the system Python of Debian 12+ and Ubuntu 23.04+, whose pip refuses to
# install), it makes the virtual environment .venv here and installs into it instead.
# Where no torch is importable, torch==2.13.0 goes in first (`install_torch`), so that resolving vitlab's
# `torch>=2.4` keeps it: without an NVIDIA GPU the CPU wheel from PyTorch's CPU index (PyPI's Linux wheel is
# the CUDA build, with gigabytes of CUDA libraries), with one the default (CUDA) wheel. A torch already
# importable is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# pip's own test (PEP 668): a marker file in the standard library's folder, ignored inside a virtual environment.
externally_managed() {
    "$1" -c 'import sys, sysconfig, pathlib
marker = pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if marker.is_file() and sys.prefix == sys.base_prefix else 1)'
}

venv=""
if externally_managed "$PY"; then
    venv=.venv
    echo "$PY is externally managed (PEP 668): installing vitlab into the virtual environment $venv"
    if [ ! -x "$venv/bin/python" ] && ! "$PY" -m venv "$venv"; then
        rm -rf "$venv"
        echo "could not make $venv; install the venv module (Debian/Ubuntu: sudo apt install python3-venv) and rerun" >&2
        exit 1
    fi
    PY=$venv/bin/python
fi

TORCH=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu  # PyTorch's own index of CPU-only wheels (and their dependencies)

install_torch() {
    local found
    if found=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
        echo "torch $found is importable: keeping it"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "NVIDIA GPU found: installing $TORCH from the default index (the CUDA build on Linux)"
        "$PY" -m pip install --quiet "$TORCH"
    else
        echo "no NVIDIA GPU (nvidia-smi absent or failing): installing the CPU wheel of $TORCH from $CPU_INDEX"
        if ! "$PY" -m pip install --quiet --retries 2 --index-url "$CPU_INDEX" "$TORCH"; then
            echo "$CPU_INDEX could not be used: installing $TORCH from the default index instead" \
                "(on Linux x86-64 that is the CUDA build, which also runs on a CPU)"
            "$PY" -m pip install --quiet "$TORCH"
        fi
    fi
}

install_torch
"$PY" -m pip install --quiet -e ".${extras}"

if [ -n "$venv" ]; then
    # Make `vitlab` reachable by name where ~/.local/bin is on PATH (as pipx does); otherwise say how.
    bin="$HOME/.local/bin"
    if [[ ":$PATH:" == *":$bin:"* ]] && { [ ! -e "$bin/vitlab" ] || [ -L "$bin/vitlab" ]; }; then
        ln -sf "$PWD/$venv/bin/vitlab" "$bin/vitlab"
        echo "linked $bin/vitlab to $venv/bin/vitlab: \`vitlab\` works in any shell"
    else
        echo "vitlab is in $venv: run $venv/bin/vitlab, or \`source $venv/bin/activate\` first to type \`vitlab\`"
    fi
    echo "tests: $venv/bin/python -m pytest (or python3 -m pytest after \`source $venv/bin/activate\`)"
fi
