"""Test inputs are the same in every process: seeds come from digests of case ids, never from
Python's hash(), which is salted per process (PYTHONHASHSEED) and made CI fail at random."""

import ast
import os
import pathlib
import subprocess
import sys

import torch

from reference import case_seed

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


def _in_a_process(code, hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_case_seed_is_the_same_in_every_process():
    code = ("from reference import case_seed; import torch; "
            "print(case_seed((1,), 13, 7, str(torch.bfloat16), 'Tanh()'), case_seed('tests/x.py::t[a]'))")
    outputs = {_in_a_process(code, seed) for seed in (0, 1, 2)}
    assert len(outputs) == 1, outputs
    assert outputs.pop().split() == [str(case_seed((1,), 13, 7, str(torch.bfloat16), "Tanh()")),
                                     str(case_seed("tests/x.py::t[a]"))]


def test_case_seed_separates_cases():
    seeds = {case_seed(lead, k) for lead in ((1,), (37,), (5, 7)) for k in (1, 13, 71)}
    assert len(seeds) == 9


def test_each_test_starts_from_its_own_seed(request):
    """conftest seeds torch's global RNG from the test id before every test."""
    draw = torch.rand(3)
    torch.manual_seed(case_seed(request.node.nodeid))
    assert torch.equal(draw, torch.rand(3))


def test_no_seed_comes_from_hash():
    """hash() of anything holding a str differs per process; no test or bench file calls it."""
    offenders = []
    for folder in ("tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "hash() called at: " + ", ".join(offenders)
