#!/usr/bin/env bash
# Set up bnlab from a fresh clone: a virtual environment in .venv with torch first (default the
# CPU build torch==2.13.0; set TORCH_SPEC to choose another), then bnlab with its test extras, the
# compiled kernels, and the real Fashion-MNIST from Debian's package when apt-get can install it
# (elsewhere `bnlab train` downloads the data on first use). Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip_install() {
    # pip's warnings about this machine's unused index folders are noise; its errors still show.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}
# torch first and pinned: a bare `torch` requirement would pull the newest build with its CUDA wheels.
pip_install "$torch_spec"
pip_install -e '.[test]'

data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

.venv/bin/bnlab kernels build >/dev/null
