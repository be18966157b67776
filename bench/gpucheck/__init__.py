"""The parts of the staged GPU check (bench/gpu_check.sh, orchestrated by bench/gpu_check.py).

One job per module:

    proc         run one command in its own process group: timeout, SIGINT, grace, SIGKILL
    plan         stage names, default budgets, the OUT file names, the headline case ids
                 (no torch: the orchestrator imports it)
    stages       how each stage is run and how its key figures are read back (no torch)
    report       summary.md and the final table, from the stages' JSON (no torch)
    env          environment probe, run as a subprocess: device, versions, tools
    correctness  stage 1: which tests cover every kernel first, and their report groups
                 (no torch, no pytest: the orchestrator builds the command from it)
    silicon      stage 1's pytest plugin: selects those tests, writes correctness.json
    headline     stage 2: the headline benchmark rows with same-run baselines

The orchestrator itself never imports torch or triton: every stage runs in a subprocess whose
environment (TRITON_INTERPRET, FASTMLP_AUTOTUNE, ...) is set before anything is imported.
"""
