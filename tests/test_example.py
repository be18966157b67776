"""examples/seed_two_layer.py runs end to end (small), and both loops end with the same weights."""

import os
import re
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seed_example_runs_and_matches_the_stock_loop():
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # the example runs the product, not the kernels' test mode
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "examples", "seed_two_layer.py"),
         "--epochs", "3", "--samples", "640", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "stock   epochs (s):" in out and "fastmlp epochs (s):" in out
    assert re.search(r"median \d+\.\d+x", out), out
    diff = float(re.search(r"largest relative weight difference after training: (\S+)", out).group(1))
    assert diff < 1e-5, out
