"""The GPU check's environment probe: device, versions and tools, written as one JSON file.

    python -m bench.gpucheck.env OUT.json

Run as a subprocess so that the orchestrator never imports torch (a CUDA context held by it
would sit on the GPU through every stage) and so that a broken install shows up as this
probe's error in summary.json instead of a crash of the whole check.
"""

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
        activations = list(getattr(fastmlp, "ACTIVATIONS", ("relu", "none")))
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
        "pytest_xdist": importlib.util.find_spec("xdist") is not None,
        "pytest_timeout": importlib.util.find_spec("pytest_timeout") is not None,
        "cpu_count": os.cpu_count(),
        "activations": activations,
        "fastmlp_import_error": fastmlp_error,
        "platform": platform.platform(),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.gpucheck.env OUT.json", file=sys.stderr)
        return 2
    result = probe()
    with open(argv[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps({k: result[k] for k in ("has_cuda", "device", "nvidia_smi",
                                              "compute_sanitizer")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
