"""Stage 1 of the GPU check: which of the project's tests say "correct on silicon", and how each
result becomes a row of correctness.json.

There is one definition of correct: the tests (tests/*.py, with fastmlp.testing's float64
references and tolerances, NaN-poisoned kernel outputs). This stage runs a subset of them that
covers every fused kernel first, on the GPU, through pytest (bench/gpucheck/silicon.py is the
plugin that selects it and writes correctness.json; bench/gpucheck/stages.py builds the command):

* the Linear+activation op: forward, dX and dW + db for every activation in fp32, fp16 and
  bf16, TF32 on the matrix-unit layouts, the seed's shapes, primes, M = 1, 3-D, no bias,
  transposed, sliced and strided inputs, NaN and inf; the launchers with a row split of dW;
  addressing past 2**31 elements;
* the gated op (fastmlp/gated.py): every activation and dtype, odd shapes, packed weights,
  strided inputs, NaN and inf, the dW kernel's row split and gradient subsets;
* fastmlp.SGD's kernel (plain, nesterov + weight decay, dampening + maximize; fp16/bf16 against
  float64), also inside a CUDA graph;
* fit with the CUDA graph against fit without it; FusedLinear, fuse() and FusedMLP modules.

Why a subset and not every test marked gpu: on a cold Triton cache the stage is compile-bound
(every activation x dtype class x kernel x specialisation is one compile), and it must bring
back a verdict on every kernel within its budget even if the window ends right after it. The
whole suite runs next, in stage 3, on a cache this stage has warmed.

On a GPU each selected test runs its Triton-on-CUDA variant (the `impl` parameter "triton-cuda",
or the `device` fixture, which is "cuda" there); in the dry run (--allow-cpu) the
"triton-interpreter" variant of a smaller slice runs instead, and the GPU-only tests not at all.

Imports neither torch nor pytest (the orchestrator imports this module to build the command).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

# The plugin's import name, and the report's groups in the order the stage runs them (the seed
# network's parts first: few kernels, and what a cut-short window most needs).
PLUGIN = "bench.gpucheck.silicon"
GROUPS = ("modules", "SGD", "fit", "linear_act", "gated")
# The report's dtype labels (labels(): a dtype parameter, or TF32's "mode"; fp32 when none says).
DTYPE_LABELS = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                "torch.float64": "fp64", "tf32": "tf32", "bf16": "bf16"}

Params = Dict[str, str]   # parameter name -> str(value); "id"; "activation" (see Entry)


@dataclass(frozen=True)
class Entry:
    """One test function of the subset.

    where: which of its parametrisations run on the GPU (None: all); tiny: which run in the dry
    run under the interpreter (None: the same as on the GPU; False: none: the test needs CUDA,
    or takes the interpreter more than a few seconds, like the seed network's 1000-wide layer).
    Both see the parameters as strings: str of each value, "id" (the test's parameter id), and
    "activation" as fastmlp names it (silicon.py: the canonical name, with a leaky_relu slope
    other than the default appended, e.g. "leaky_relu-0.3")."""

    group: str
    test: str                                   # "tests/<file>.py::<function>"
    where: Optional[Callable[[Params], bool]] = None
    tiny: object = None

    @property
    def path(self) -> str:
        return self.test.split("::")[0]

    def runs_in(self, tiny: bool) -> bool:
        """Whether this entry selects anything in this mode (a GPU-only test has no dry run)."""
        return not (tiny and self.tiny is False)

    def selects(self, params: Params, tiny: bool) -> bool:
        if tiny:
            if self.tiny is False:
                return False
            if callable(self.tiny):
                return bool(self.tiny(params)) and (self.where is None or self.where(params))
        return self.where is None or bool(self.where(params))


def _fp32(p: Params) -> bool:
    return p.get("dtype") == "torch.float32"


def _in(name: str, *values: str) -> Callable[[Params], bool]:
    return lambda p: p.get(name) in values


# SGD option sets (momentum, dampening, weight_decay, nesterov, maximize): plain, nesterov with
# weight decay, dampening with maximize. One compile each; the suite runs all 16.
_SGD_SETS = {("0.0", "0.0", "0.0", "False", "False"), ("0.9", "0.0", "0.05", "True", "False"),
             ("0.9", "0.3", "0.05", "False", "True")}


def _sgd_set(p: Params) -> bool:
    return tuple(p.get(k) for k in ("momentum", "dampening", "weight_decay", "nesterov",
                                    "maximize")) in _SGD_SETS


LA, LAK = "tests/test_linear_act.py::", "tests/test_linear_act_kernels.py::"
GA = "tests/test_gated.py::"

SELECTION: Tuple[Entry, ...] = (
    # the seed network's modules, SGD and fit
    Entry("modules", "tests/test_nn.py::test_module_matches_torch"),
    Entry("modules", "tests/test_nn.py::test_fused_model_same_outputs_and_gradients", tiny=False),
    Entry("modules", "tests/test_nn.py::test_seed_network_sgd_steps_match_stock_torch", tiny=False),
    Entry("modules", "tests/test_mlp.py::test_matches_float64_sequential",
          tiny=lambda p: p["id"].endswith(("-seed", "-w32-3d"))),
    Entry("SGD", "tests/test_optim.py::test_triton_kernel_trajectory_matches_torch",
          where=_sgd_set),
    Entry("SGD", "tests/test_optim.py::test_triton_half_precision_against_float64"),
    Entry("SGD", "tests/test_optim.py::test_cuda_graph_step_with_lr_change", tiny=False),
    Entry("fit", "tests/test_train.py::test_fit_through_triton_kernels_matches_torch"),
    Entry("fit", "tests/test_graph_step.py::test_cuda_graph_fit_matches_eager", tiny=False),
    Entry("fit", "tests/test_graph_step.py::test_cuda_graph_survives_changes_between_fit_calls",
          tiny=False),
    # Linear + activation
    Entry("linear_act", LA + "test_matches_float64_reference",
          tiny=lambda p: _fp32(p) and p["K"] in ("100", "13", "19")),
    Entry("linear_act", LA + "test_every_activation_matches_float64_reference",
          tiny=lambda p: _fp32(p) and p["K"] == "71"),
    Entry("linear_act", LA + "test_without_bias", tiny=lambda p: _fp32(p) and p["activation"]
          in ("relu", "gelu")),
    Entry("linear_act", LA + "test_strided_and_transposed_inputs_on_matrix_units",
          tiny=lambda p: p["mode"] == "tf32" and p["activation"] == "relu"),
    Entry("linear_act", LA + "test_nan_and_inf_propagate_like_torch",
          tiny=_in("activation", "relu", "gelu")),
    Entry("linear_act", LAK + "test_activation_kernels_match_float64_torch",
          where=lambda p: p["dtype"] != "torch.float64", tiny=_fp32),
    Entry("linear_act", LAK + "test_grad_weight_row_split"),
    Entry("linear_act", LAK + "test_int64_addressing_past_2_pow_31_elements", tiny=False),
    # the gated op
    Entry("gated", GA + "test_every_activation_matches_float64_reference", tiny=_fp32),
    Entry("gated", GA + "test_odd_shapes", tiny=_in("activation", "silu")),
    Entry("gated", GA + "test_packed_weight",
          tiny=lambda p: _fp32(p) and p["activation"] == "silu"),
    Entry("gated", GA + "test_strided_and_transposed_inputs", tiny=_fp32),
    Entry("gated", GA + "test_nan_and_inf_propagate_like_torch",
          tiny=_in("activation", "silu", "relu")),
    Entry("gated", GA + "test_weight_gradients_split_and_flags", tiny=_in("activation", "gelu")),
    Entry("gated", GA + "test_grad_input_kernel_with_strided_saved_tensors"),
    Entry("gated", GA + "test_triton_backend_runs_the_kernels"),
    Entry("gated", GA + "test_function_without_saved_gate_and_up_recomputes_them"),
)
BY_TEST = {e.test: e for e in SELECTION}
assert len(BY_TEST) == len(SELECTION), "an entry is listed twice"
assert all(e.group in GROUPS for e in SELECTION)

# The `impl` parameter (tests/conftest.py) the stage keeps: the Triton kernels on the device.
KERNEL_IMPL = {False: "('triton', 'cuda')", True: "('triton', 'cpu')"}


def test_files() -> List[str]:
    """The test files to collect, in the selection's order."""
    return list(dict.fromkeys(e.path for e in SELECTION))


def select(nodeid: str, params: Params, tiny: bool) -> Optional[Entry]:
    """The entry that selects this test item, or None. nodeid: pytest's, relative to the
    repository; params: str of each parameter value (callspec), and "id"."""
    entry = BY_TEST.get(nodeid.split("[", 1)[0])
    if entry is None:
        return None
    if "impl" in params and params["impl"] != KERNEL_IMPL[tiny]:
        return None
    return entry if entry.selects(params, tiny) else None


def labels(params: Params) -> Tuple[str, str]:
    """(dtype, activation) of a test for the report, from its parameters: a dtype parameter (or
    TF32's "mode"), else a dtype inside a case tuple, else fp32; the activation's name."""
    dtype = next((DTYPE_LABELS[params[k]] for k in ("dtype", "mode")
                  if params.get(k) in DTYPE_LABELS), None)
    if dtype is None:
        text = " ".join(v for k, v in params.items() if k != "id")
        dtype = next((label for name, label in DTYPE_LABELS.items()
                      if name.startswith("torch.") and name in text), "fp32")
    return dtype, params.get("activation", "-")


def order_key(entry: Entry, params: Params, index: int) -> tuple:
    """Run order: by group, then tests that share kernels (same activation and dtype) next to
    each other, so that pytest-xdist's batches of consecutive tests compile each kernel once
    rather than in every worker."""
    dtype, activation = labels(params)
    return (GROUPS.index(entry.group), activation, dtype, SELECTION.index(entry), index)


def worst(comparisons: List[list]) -> Optional[list]:
    """The comparison [what, dtype, error, tolerance] nearest to (or furthest past) its tolerance."""
    ratios = [(c[2] / c[3], c) for c in comparisons if c[3]]
    return max(ratios, key=lambda rc: rc[0])[1] if ratios else None
