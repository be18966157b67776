"""The pytest plugin of the GPU check's correctness stage: runs the tests of
bench/gpucheck/correctness.py's SELECTION and writes correctness.json as they finish.

    python -m pytest <the selection's files> -p bench.gpucheck.silicon --silicon-out OUT.json
           [--silicon-tiny] [-n N]

What it does, and where:
* collection (pytest itself, or each xdist worker): keeps only the selected items (the rest are
  reported deselected), in correctness.order_key's order, each labelled with its group, dtype
  and activation (user_properties, which travel with every report of the item);
* each test's call (where it runs): every fastmlp.testing.assert_close is recorded
  (record_comparisons); the count, the comparison closest to its tolerance and whether kernel
  outputs were NaN-poisoned go with the test's report;
* reports (pytest itself, or xdist's controller, which sees only reports): one row per test;
  correctness.json is rewritten at most once a second and at the end, also when the session is
  interrupted (SIGINT: the stage's timeout), then marked incomplete with the tests not finished.

Without --silicon-out the plugin does nothing, so loading it changes no other run.
"""

import datetime
import json
import os
import time

import pytest

from bench.gpucheck import correctness

LABELS = "silicon-labels"
RESULT = "silicon-result"
WRITE_EVERY_S = 1.0


def pytest_addoption(parser):
    group = parser.getgroup("silicon", "fastmlp GPU check, correctness stage")
    group.addoption("--silicon-out", default=None, help="correctness.json to write")
    group.addoption("--silicon-tiny", action="store_true",
                    help="the dry run's slice (interpreter variants), not the GPU's")


def _active(config) -> bool:
    return bool(config.getoption("silicon_out", default=None))


def _params(item) -> correctness.Params:
    """What the selection sees of an item's parameters (correctness.Entry): str of each value,
    the id, and the activation by its fastmlp name (tests pass names, nn modules, None, or a
    name and a slope)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return {"id": ""}
    values = callspec.params
    params = {k: str(v) for k, v in values.items()}
    params["id"] = callspec.id
    if "activation" in values or ("name" in values and "alpha" in values):
        from fastmlp import activations

        spelled = values["activation"] if "activation" in values else values["name"]
        try:
            name, alpha = activations.resolve(spelled)
        except (TypeError, ValueError):   # not an activation after all: leave it as it is
            return params
        alpha = values.get("alpha", alpha)
        default = activations.get(name).default_alpha
        sloped = name == "leaky_relu" and alpha != default
        params["activation"] = f"{name}{alpha:g}" if sloped else name
    return params


def pytest_configure(config):
    if not _active(config):
        return
    config.addinivalue_line("markers", "silicon: selected by the GPU check's correctness stage")
    if not hasattr(config, "workerinput"):   # pytest itself, or xdist's controller
        config.pluginmanager.register(Recorder(config), "silicon-recorder")


@pytest.hookimpl(tryfirst=True)   # the selection and its order, before xdist's worker sends them
def pytest_collection_modifyitems(session, config, items):
    if not _active(config):
        return
    tiny = config.getoption("silicon_tiny")
    chosen, dropped = [], []
    for index, item in enumerate(items):
        params = _params(item)
        entry = correctness.select(item.nodeid, params, tiny)
        if entry is None:
            dropped.append(item)
            continue
        dtype, activation = correctness.labels(params)
        item.user_properties.append((LABELS, {"group": entry.group, "dtype": dtype,
                                              "activation": activation}))
        item.add_marker("silicon")
        chosen.append((correctness.order_key(entry, params, index), item))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = [item for _, item in sorted(chosen, key=lambda ki: ki[0])]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _active(item.config):
        yield
        return
    from fastmlp import testing
    from fastmlp.kernels import debug

    with testing.record_comparisons() as log:
        yield
    item.user_properties.append((RESULT, {
        "comparisons": len(log), "worst": correctness.worst([list(c) for c in log]),
        "poisoned": bool(debug.POISON_OUTPUTS)}))   # as the test ran (fixtures restore it after)


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:   # a skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return crash.message.strip().splitlines()[0][:400]
    text = (getattr(report, "longreprtext", "") or "").strip().splitlines()
    return text[-1][:400] if text else ""


class Recorder:
    """Rows from test reports, and correctness.json (in pytest or xdist's controller only)."""

    def __init__(self, config):
        self.path = config.getoption("silicon_out")
        self.tiny = config.getoption("silicon_tiny")
        self.started = time.monotonic()
        self.rows = {}              # nodeid -> row, in the order tests start reporting
        self.selected = None        # node ids of the collection after selection, once known
        self.collection_errors = []
        self.last_write = 0.0
        self.meta = {
            "stage": "correctness",
            "schema": "fastmlp-gpu-check-correctness/2",
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "mode": "dry run (interpreter)" if self.tiny else "gpu",
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            "autotune": os.environ.get("FASTMLP_AUTOTUNE", "1"),
            "poison_env": os.environ.get("FASTMLP_POISON_OUTPUTS", "0"),
            "measure": "the tests' own checks: fastmlp.testing.assert_close (relative norm error "
                       "against float64 torch, under the dtype's tolerance or 4x torch's own "
                       "error); err/tol: the comparison closest to its tolerance",
            "selection": [{"group": e.group, "test": e.test} for e in correctness.SELECTION
                          if e.runs_in(self.tiny)],
        }
        self.write(complete=False)

    # -- what is selected ------------------------------------------------------------------
    def _selected(self, nodeids) -> None:
        if self.selected is None:
            self.selected = list(nodeids)
            self.write(complete=False)

    def pytest_collection_finish(self, session):
        if not session.config.pluginmanager.has_plugin("dsession"):   # no xdist: pytest collected
            self._selected(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        """xdist: the controller collects nothing itself; a worker's collection says."""
        self._selected(ids)

    def pytest_collectreport(self, report):
        if report.failed:
            self.collection_errors.append(f"{report.nodeid}: {_reason(report)}")

    # -- results ---------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report):
        row = self.rows.get(report.nodeid)
        if row is None:
            base, _, params_id = report.nodeid.partition("[")
            # A report without labels (an xdist worker that crashed on this test): the group
            # from the selection, so the failure shows in its group's cell.
            entry = correctness.BY_TEST.get(base)
            row = self.rows[report.nodeid] = {
                "group": entry.group if entry is not None else "?",
                "test": base.split("::")[-1], "id": params_id[:-1],
                "nodeid": report.nodeid, "dtype": None, "activation": None, "status": None,
                "seconds": 0.0, "comparisons": 0, "err": None, "tol": None, "what": None,
                "poisoned": None, "reason": None}
        row["seconds"] += report.duration or 0.0
        for name, value in report.user_properties:
            if name == LABELS:
                row.update(value)
            elif name == RESULT:
                row.update(comparisons=value["comparisons"], poisoned=value["poisoned"])
                if value["worst"]:
                    row["what"], _, row["err"], row["tol"] = value["worst"]
        if report.failed:
            row["status"] = "fail"
            prefix = "" if report.when == "call" else f"in {report.when}: "
            row["reason"] = row["reason"] or prefix + _reason(report)
        elif report.skipped and row["status"] is None:
            row["status"] = "skipped"
            row["reason"] = _reason(report)
        elif report.when == "call" and report.passed and row["status"] is None:
            row["status"] = "pass"
        if time.monotonic() - self.last_write >= WRITE_EVERY_S:
            self.write(complete=False)

    @pytest.hookimpl(tryfirst=True)   # before xdist's teardown, which can wait 10 s on SIGINT
    def pytest_sessionfinish(self, session, exitstatus):
        interrupted = int(exitstatus) == int(pytest.ExitCode.INTERRUPTED)
        self.write(complete=not interrupted and not self.collection_errors,
                   interrupted=("SIGINT (the stage's timeout)" if interrupted and not
                                self.collection_errors else None),
                   exitstatus=int(exitstatus))

    # -- the file --------------------------------------------------------------------------
    def write(self, complete: bool, interrupted=None, exitstatus=None) -> None:
        """correctness.json, atomically: tests with a verdict are rows; the selected ones
        without one (not started, or in flight when the stage ended) are `unfinished`."""
        from bench.gpucheck import report

        rows = [dict(r) for r in self.rows.values() if r["status"] is not None]
        done = {r["nodeid"] for r in rows}
        unfinished = [n for n in (self.selected or []) if n not in done]
        result = dict(self.meta, complete=bool(complete and self.selected is not None
                                               and not unfinished),
                      interrupted=interrupted, exitstatus=exitstatus,
                      seconds=time.monotonic() - self.started,
                      tests_total=len(self.selected) if self.selected is not None else None,
                      tests_done=len(rows), unfinished=unfinished,
                      unmatched=self._unmatched(), collection_errors=self.collection_errors,
                      matrix=report.correctness_matrix(rows), rows=rows)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.path)
        self.last_write = time.monotonic()

    def _unmatched(self):
        """Entries of the selection that no collected test matched (a renamed test, a changed
        parameter): None until the collection is known."""
        if self.selected is None:
            return None
        bases = {n.split("[", 1)[0] for n in self.selected}
        return [e.test for e in correctness.SELECTION
                if e.runs_in(self.tiny) and e.test not in bases]
