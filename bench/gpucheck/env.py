"""The GPU check's environment probe: device, versions and tools, written as one JSON file.

    python -m bench.gpucheck.env OUT.json
    python -m bench.gpucheck.env --digest      (print the tree digest of this checkout)

Run as a subprocess so that the orchestrator never imports torch (a CUDA context held by it
would sit on the GPU through every stage) and so that a broken install shows up as this
probe's error in summary.json instead of a crash of the whole check.
"""

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Optional

from bench import environment


def find_compute_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, under $CUDA_HOME / $CUDA_PATH, or in a /usr/local/cuda* toolkit."""
    import glob

    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for root in filter(None, roots):
        for sub in ("bin", "compute-sanitizer"):
            path = os.path.join(root, sub, "compute-sanitizer")
            if os.access(path, os.X_OK):
                return path
    return None


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGEST_DIRS = ("fastmlp", "kernels", "bench", "tests")
DIGEST_SUFFIXES = (".py", ".sh", ".toml", ".c", ".cfg")


def tree_digest(root: str = REPO_ROOT) -> str:
    """sha256 (first 16 hex digits) of the source files that ran: the GPU machine gets a plain
    copy of the working tree, with no .git and maybe uncommitted edits, so the git commit alone
    cannot say what was checked. The same command on the sending side gives the same digest."""
    h = hashlib.sha256()
    paths = [os.path.join(root, "pyproject.toml")]
    for top in DIGEST_DIRS:
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "results")
                             and not d.startswith("."))
            paths += [os.path.join(folder, f) for f in files if f.endswith(DIGEST_SUFFIXES)]
    for path in sorted(paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def _c_compiler() -> Optional[str]:
    """What Triton's launcher build would use ($CC, clang, gcc): without one no kernel runs."""
    return os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc")


def _python_header() -> bool:
    import sysconfig

    return os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))


def _nvidia_smi() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                              "power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or out.stderr.strip()
    except (subprocess.TimeoutExpired, OSError) as exc:  # informational only
        return f"not read ({exc})"


def probe() -> dict:
    import torch

    has_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if has_cuda else "cpu")
    info = environment.device_info(device)
    try:
        import fastmlp
        activations = list(fastmlp.ACTIVATIONS)
        fastmlp_error = None
    except Exception as exc:  # reported, and the stages will fail on it visibly
        activations, fastmlp_error = [], f"{type(exc).__name__}: {exc}"
    return {
        "has_cuda": has_cuda,
        "device": info,
        "device_slug": environment.device_slug(info),
        "versions": environment.versions(),
        "python_executable": sys.executable,
        "nvidia_smi": _nvidia_smi(),
        "compute_sanitizer": find_compute_sanitizer(),
        # stages 1 and 3 run the project's tests; the GPU machine's image has pytest, xdist and
        # pytest-timeout (nothing can be installed there)
        "pytest": importlib.util.find_spec("pytest") is not None,
        "pytest_xdist": importlib.util.find_spec("xdist") is not None,
        "pytest_timeout": importlib.util.find_spec("pytest_timeout") is not None,
        "cpu_count": os.cpu_count(),
        "tree_digest": tree_digest(),
        "c_compiler": _c_compiler(),
        "python_h": _python_header(),
        "activations": activations,
        "fastmlp_import_error": fastmlp_error,
        "platform": platform.platform(),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--digest"]:
        print(tree_digest())
        return 0
    if len(argv) != 1:
        print("usage: python -m bench.gpucheck.env OUT.json | --digest", file=sys.stderr)
        return 2
    result = probe()
    with open(argv[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps({k: result[k] for k in ("has_cuda", "device", "nvidia_smi",
                                              "compute_sanitizer", "tree_digest", "c_compiler",
                                              "python_h")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
