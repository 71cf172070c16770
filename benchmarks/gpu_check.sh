#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with no network:
#
#   bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--budget SECONDS]
#   bash benchmarks/gpu_check.sh --profile [--smoke] [--out DIR]
#
# JSON goes to --out, else $OUT where set, else benchmarks/results/gpu.
# It runs benchmarks/gpu_check.py (see its docstring) with the packages the
# machine lacks (anndata, scvi-tools 1.4.2 and their needs) installed from the
# wheel folder .whl/ (or $WHEELS), which git ignores. Fill that folder first,
# on a machine with network access: bash benchmarks/gpu_wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
if ! "$PY" -c "import anndata" 2>/dev/null && [ -d "$WHEELS" ]; then
  SITE=${TMPDIR:-/tmp}/jaxscanvi-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  # anndata 0.12 needs pandas < 3: bring one where the machine has a newer one
  if ! "$PY" -c "import pandas, sys; sys.exit(int(pandas.__version__.split('.')[0]) >= 3)"; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/optional/*.whl || exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# --profile: the training-step profile (benchmarks/gpu_profile.py) instead
for arg in "$@"; do
  if [ "$arg" = "--profile" ]; then
    args=()
    for a in "$@"; do [ "$a" = "--profile" ] || args+=("$a"); done
    exec "$PY" benchmarks/gpu_profile.py "${args[@]}"
  fi
done
exec "$PY" benchmarks/gpu_check.py "$@"
