#!/usr/bin/env bash
# The README's first command on a fresh venv, timed step by step: a fresh clone of this checkout's
# HEAD in DIR (default /tmp/simbench-fresh), every package downloaded again (PIP_NO_CACHE_DIR=1),
# and an empty response cache.
# Prints install_s, install_model_s, run_s and total_s; the report is DIR/runs/example/report.html.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-/tmp/simbench-fresh}"
rm -rf "$dir" && git clone -q "$repo" "$dir" && cd "$dir"
export PIP_NO_CACHE_DIR=1
export SIMBENCH_CACHE="$dir/responses.sqlite"  # an empty response cache, as on a new machine
t0=$(date +%s.%N)
python3 -m venv .venv && . .venv/bin/activate && pip install -q '.[local]'
t1=$(date +%s.%N)
simbench install-model
t2=$(date +%s.%N)
simbench run examples/tutor.yaml --out runs/example
t3=$(date +%s.%N)
python3 -c "import sys; a=[float(x) for x in sys.argv[1:]]; print(f'install_s={a[1]-a[0]:.1f} install_model_s={a[2]-a[1]:.1f} run_s={a[3]-a[2]:.1f} total_s={a[3]-a[0]:.1f}')" $t0 $t1 $t2 $t3
