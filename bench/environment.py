"""Where a result came from: device, library versions, git commit and the command line.

A figure without these cannot be reproduced or compared, so every results folder carries them.
"""

import datetime
import os
import platform
import re
import subprocess
import sys
from typing import Optional

import torch


def device_info(device: torch.device) -> dict:
    """Name and key properties of the device the workloads ran on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1)}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads(),
            "logical_cpus": os.cpu_count()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list]:
    """1, 5 and 15-minute load averages: a busy shared machine shows here, next to its timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_slug(info: dict) -> str:
    """Short folder-safe device name: "cpu", "h100-80gb-hbm3", …"""
    if info["type"] == "cpu":
        return "cpu"
    name = info["name"].lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # an absent or broken package is a fact to report, not a crash
        return None
    return getattr(mod, "__version__", None)


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict:
    """Python, torch, triton, CUDA, cuDNN, fastmlp, numpy and the git commit of the checkout."""
    status = _git("status", "--porcelain")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "fastmlp": _version("fastmlp"),
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "platform": platform.platform(),
    }


def command_line() -> str:
    """The command as typed, as closely as Python can tell: python -m bench <args>."""
    argv = sys.argv[1:]
    entry = "python -m bench" if sys.argv and sys.argv[0].endswith(
        os.path.join("bench", "__main__.py")) else os.path.basename(sys.argv[0] or "python")
    return " ".join([entry, *argv]).strip()


def today() -> str:
    return datetime.date.today().isoformat()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
