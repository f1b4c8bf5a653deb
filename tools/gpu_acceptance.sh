#!/usr/bin/env bash
# The GPU acceptance run (tools/gpu_acceptance.py): every strategy and the calibration on a real GPU in one command
# of at most 8 minutes; `--simulate` runs the same logic on CPU. Needs nothing from the network: the wheels the GPU
# machine lacks travel in .whl/ (tools/gpu_wheels.sh) and are installed into a target folder, never into the system.
#   bash tools/gpu_acceptance.sh [--simulate] [--json PATH] [--budget-s S]     PYTHON=... chooses the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
simulate=0
for arg in "$@"; do [[ "$arg" == "--simulate" ]] && simulate=1; done
if (( ! simulate )); then
  if compgen -G ".whl/*.whl" > /dev/null; then
    target=${WHEEL_TARGET:-${TMPDIR:-/tmp}/lowvram-gpu-wheels}
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $target (--no-index --no-deps)"
    "$PY" -m pip install --quiet --no-index --no-deps --target "$target" .whl/*.whl
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in .whl/: using the installed packages (tools/gpu_wheels.sh fetches them where pip works)"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 8 minutes in all: the script skips sections that would end past its own budget (7.5 min); this is the backstop.
exec timeout --signal=INT 480 "$PY" tools/gpu_acceptance.py "$@"
