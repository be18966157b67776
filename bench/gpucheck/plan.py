"""What the GPU check runs, in which order, for how long, and which files it leaves in OUT.

The numbers come from the GPU window this check is made for (bench/NOTES.md, "The GPU check's
stage budgets"): about 15 minutes of device time in all, 1-2 of them to start the machine, at
most 10 minutes per command, and at most 8 files brought back. The default total of 480 s leaves
the device tool's `timeout_s` of ~540 s a minute of margin for the environment probe, packing
and the final summary.

No torch here: the orchestrator imports this module and must stay light and unaffected by
whatever the stages import.
"""

from typing import Dict, List, Tuple

from bench import cases

# Stages in order of value: what a short window must bring back first comes first.
STAGES = ("correctness", "headline", "tests", "sanitizer", "bench")

# Seconds per stage by default; "bench" gets whatever is left of the total budget.
DEFAULT_BUDGET_S = 480.0
DEFAULT_STAGE_BUDGET_S: Dict[str, float] = {
    "correctness": 150.0,   # compile-bound: the tests' subset in pytest-xdist workers (~584
                            # kernel specialisations counted by the review: 60-170 s)
    "headline": 150.0,      # autotune + timing of 6 rows, torch.compile within its own budget
    "tests": 70.0,          # pytest -n 8 on the cache stage 1 warmed (cannot finish: a sample)
    "sanitizer": 60.0,      # memcheck then racecheck, small shapes
}
DEFAULT_COMPILE_BUDGET_S = 45.0   # torch.compile baselines inside the headline stage
DEFAULT_GRACE_S = 20.0            # SIGINT -> SIGKILL
SHORT_GRACE_S = 5.0               # the same for commands that write nothing on SIGINT
BENCH_MIN_S = 30.0                # below this, the remaining rows are not worth starting
PACK_RESERVE_S = 10.0             # packing the bench results and the last summary
ENV_PROBE_TIMEOUT_S = 60.0

# Every file the check writes in OUT (the device tool brings back at most 8, one level deep).
FILES = {
    "summary_json": "summary.json",      # machine-readable: every stage, key figures, versions
    "summary_md": "summary.md",          # the same for people, with the tables
    "log": "check.log",                  # every stage's stdout and stderr, in order
    "correctness": "correctness.json",   # stage 1: every test with its closest error/tolerance
    "headline": "headline.json",         # stage 2: bench records + autotuner picks
    "junit": "junit.xml",                # stage 3
    "bench": "bench-results.tar.gz",     # stage 5: python -m bench's results folder
}
MAX_OUT_FILES = 8

# Stage 2's rows, most valuable first: the tensor-core shapes, then the seed step and epoch.
# (workload, shape index in the catalogue's MLP shapes or None for the seed, dtype, pass)
HEADLINE: Tuple[Tuple[str, object, str, str], ...] = (
    ("mlp-layer", 1, "bf16", "fwd"),        # 8192x4096->4096
    ("mlp-layer", 1, "bf16", "fwd+bwd"),
    ("mlp-layer", 2, "bf16", "fwd"),        # 65536x256->256, skinny
    ("mlp-layer", 2, "bf16", "fwd+bwd"),
    ("seed-model", None, "fp32", "step"),   # graphed and not (launch-bound: CUDA-graph timing)
    ("seed-epoch", None, "fp32", "epoch"),  # fit vs the stock DataLoader loop
)
TINY_MLP_INDEX = {1: 0, 2: 1}  # the tiny catalogue's stand-ins for the two MLP shapes


def headline_ids(tiny: bool) -> List[str]:
    """The case ids of stage 2, as bench.cases names them (real or tiny sizes)."""
    batch, dims, shapes = (cases.TINY_BATCH, cases.TINY_DIMS, cases.TINY_MLP_SHAPES) if tiny else (
        cases.SEED_BATCH, cases.SEED_DIMS, cases.MLP_SHAPES)
    ids = []
    for workload, index, dtype, pass_ in HEADLINE:
        if workload == "mlp-layer":
            m, k, n, _ = shapes[TINY_MLP_INDEX[index] if tiny else index]
            shape = f"{m}x{k}->{n}"
        else:  # the seed network's step and epoch
            shape = f"{batch}x" + "->".join(map(str, dims))
        ids.append(f"{workload}/{shape}/{dtype}/{pass_}")
    return ids


def headline_cases(tiny: bool) -> List[cases.Case]:
    """Stage 2's cases, taken from the catalogue so that they are exactly the report's cases."""
    by_id = {c.id: c for c in cases.catalogue("cuda", tiny=tiny)}
    missing = [i for i in headline_ids(tiny) if i not in by_id]
    if missing:
        raise LookupError(f"headline cases not in bench.cases.catalogue: {missing}; update "
                          f"bench/gpucheck/plan.py HEADLINE to the catalogue's shapes")
    return [by_id[i] for i in headline_ids(tiny)]


def rest_patterns(device_type: str, tiny: bool) -> Tuple[List[str], List[str]]:
    """`python -m bench --only` patterns for the catalogue minus the headline rows.

    --only selects the cases whose id contains a pattern, so full ids are passed. Returns
    (patterns, overlap): overlap lists headline ids that the patterns still select (an id that
    is a substring of a headline id); they are then timed twice rather than a row being lost.
    """
    head = set(headline_ids(tiny))
    rest = [c.id for c in cases.catalogue(device_type, tiny=tiny) if c.id not in head]
    overlap = sorted(h for h in head if any(p in h for p in rest))
    return rest, overlap
