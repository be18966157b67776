#!/usr/bin/env bash
# The staged GPU check in one call, from a plain copy of the repository (no install needed):
#   bash bench/gpu_check.sh OUT [options]          (options: bash bench/gpu_check.sh OUT --help)
# Stages in order of value (correctness, headline figures, test suite, compute-sanitizer, the
# remaining benchmark rows), each in its own process group with its own timeout, ~480 s in all;
# at most 8 files land in OUT. See bench/gpu_check.py and bench/NOTES.md.
# PYTHON=/path/to/python overrides the interpreter (default: the first of python, python3 that is
# Python 3 with torch importable, else the first that exists).
set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [options]   (--help for the options)" >&2
    exit 2
fi
# OUT relative to where the caller stands, not to the repository root this script moves to
case "$1" in
    -*) OUT="" ;;                                   # an option first (--help): pass it on
    *) OUT="$(mkdir -p -- "$1" && cd -- "$1" && pwd)" || exit 2; shift ;;
esac
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    first=""
    for name in python python3; do
        cand="$(command -v "$name")" || continue
        first="${first:-$cand}"
        # a `python` that is Python 2, or another install without torch, would fail every stage
        if "$cand" -c 'import importlib.util, sys
sys.exit(sys.version_info < (3, 8) or importlib.util.find_spec("torch") is None)' 2>/dev/null; then
            PY="$cand"
            break
        fi
    done
    PY="${PY:-$first}"
fi
if [ -z "$PY" ]; then
    echo "$0: neither python nor python3 on PATH (set PYTHON=...)" >&2
    exit 2
fi
exec "$PY" -m bench.gpu_check ${OUT:+"$OUT"} "$@"
