#!/usr/bin/env bash
# One-call GPU check from a plain copy of the repository: tests on CUDA, compute-sanitizer on a
# small fused forward/backward, and the benchmark report, all written under OUT (see
# bench/gpu_check.py for the files and options).
#   usage: bench/gpu_check.sh OUT [--budget 480] [--bench-args "..."] [--skip-tests] ...
set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [options of python -m bench.gpu_check]" >&2
    exit 2
fi
# OUT relative to where the caller stands, not to the repository root this script moves to
case "$1" in
    -*) OUT="" ;;                                   # an option first (--help): pass it on
    *) OUT="$(mkdir -p -- "$1" && cd -- "$1" && pwd)" || exit 2; shift ;;
esac
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PY" -m bench.gpu_check ${OUT:+"$OUT"} "$@"
