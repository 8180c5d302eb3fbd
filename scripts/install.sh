#!/usr/bin/env bash
# Installs vitlab (and, with --test, its test extras) into the current Python. Where that Python is
# "externally managed" (PEP 668: the system Python of Debian 12+ and Ubuntu 23.04+, whose pip refuses to
# install), it makes the virtual environment .venv here and installs into it instead.
# Where no torch is importable, the CPU wheel torch==2.13.0 goes in first, so that
# resolving vitlab's `torch>=2.4` never pulls the CUDA build. A GPU box keeps its torch.
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

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
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
