#!/usr/bin/env bash
# A/B: the same benches on two checkouts, one after the other on a quiet machine, so a change
# is measured against the commit before it in one run.
#
#   bench/ab.sh BEFORE_DIR AFTER_DIR OUT_DIR [ramp] [regulation] [fanout] [step]
#
# Each *_DIR is a checkout with its own .venv (pip install -e ".[dev,tools]"); each bench runs
# there with that checkout's code. Figures land in OUT_DIR/<side>-<bench>/ and OUT_DIR/*.txt.
set -euo pipefail
before=$(realpath "$1"); after=$(realpath "$2"); out=$(realpath -m "$3"); shift 3
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(step fanout ramp regulation)
mkdir -p "$out"

run() {  # side dir bench
  local side=$1 dir=$2 bench=$3 log="$out/$1-$3.txt"
  echo "== $side $bench ($(git -C "$dir" rev-parse --short HEAD)) $(date -u +%T)" | tee "$log"
  case $bench in
    step) (cd "$dir" && .venv/bin/python bench/step_bench.py --sizes 10000,100000 --cycles 30) ;;
    fanout) (cd "$dir" && .venv/bin/rampd bench fanout --sizes 10000 --out "$out/$side-fanout") ;;
    ramp) (cd "$dir" && .venv/bin/rampd bench ramp --random-steps 20 --out "$out/$side-ramp") ;;
    regulation) (cd "$dir" && .venv/bin/rampd bench regulation --out "$out/$side-regulation") ;;
    *) echo "unknown bench $bench" >&2; return 2 ;;
  esac >>"$log" 2>&1
  tail -n 40 "$log"
}

for bench in "${benches[@]}"; do
  run before "$before" "$bench"
  run after "$after" "$bench"
done
