"""The catalogue of benchmark cases: which workload, shape, dtype and pass gets timed.

One list feeds both the report runner (python -m bench) and the pytest-benchmark files, so the
two can never disagree about what a case is. A case is data only; bench.variants and bench.loops
turn it into runnable code for fastmlp and for each baseline.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from bench import costs

DTYPES = ("fp32", "tf32", "fp16", "bf16")

# The seed network (intro-to-pytorch): N, D_in, H, D_out = 64, 1000, 100, 10; 64,000 samples.
SEED_BATCH, SEED_DIMS, SEED_SAMPLES = 64, (1000, 100, 10), 64_000
# The MLP layer shapes of the issue: (M, K, N, gpu_only).
MLP_SHAPES = ((8192, 1024, 1024, False), (8192, 4096, 4096, False),
              (65536, 256, 256, False), (8192, 8192, 8192, True))
# Activations timed besides ReLU on the MLP layer shapes (fp32 and bf16): GELU in its tanh form,
# the function torch._addmm_activation(use_gelu=True) computes in cuBLASLt's epilogue (so that
# baseline computes the same thing), and SiLU.
MLP_ACTIVATIONS = ("gelu_tanh", "silu")
ACTIVATION_DTYPES = ("fp32", "bf16")
# Narrow MLPs, fastmlp.FusedMLP's workload (tiny-cuda-nn's class): in -> 4 hidden -> out, ReLU,
# batch 2**20 on GPUs; on CPU a small batch only exercises the rows.
NARROW_MLPS = ((32, 64, 64, 64, 64, 16), (32, 128, 128, 128, 128, 16))
NARROW_GPU_BATCH, NARROW_CPU_BATCH, NARROW_DTYPES = 2**20, 4096, ("fp16", "bf16", "fp32")
TINY_NARROW = (64, (8, 16, 16, 4))
# Stand-ins with the same structure for the harness's own tests (--tiny).
TINY_BATCH, TINY_DIMS, TINY_SAMPLES = 8, (16, 12, 4), 64
TINY_MLP_SHAPES = ((32, 16, 16, False), (64, 8, 8, False))
# The gated MLP block of Llama-7B (Llama 1 and 2): 4096 -> 11008 -> 4096, SwiGLU, no biases, bf16
# (the dtype it is trained and served in). Workloads: the gated op alone (gate and up
# projections, act(G) * U), the whole block (then the down projection), and the block with the
# gate and up weights packed in one [2H, K] Linear as Phi-3 holds them ("packed").
LLAMA_7B_MLP = (4096, 11008, 4096)
GATED_ACTIVATION, GATED_DTYPE = "silu", "bf16"
GATED_WORKLOADS = ("gated-linear", "gated-mlp", "gated-mlp-packed")
# Tokens per call and the passes timed there: 4096 is one sequence of Llama 2's context (a
# training micro-batch of one sequence; the prefill of one long prompt), 16384 a micro-batch of
# four such sequences (or eight of Llama 1's 2048), both forward and forward+backward; 64 is one
# decoding step of 64 sequences (forward only: nothing trains there), where the weights' bytes,
# not the FLOPs, decide.
GATED_TOKENS = ((4096, ("fwd", "fwd+bwd")), (16384, ("fwd", "fwd+bwd")), (64, ("fwd",)))
# Toy stand-in (--tiny): odd sizes (masked tiles), out = in as in the real block.
TINY_GATED = (7, (13, 19, 13))


@dataclass(frozen=True)
class Case:
    """One timed workload.

    kind:   "layer" (Linear+ReLU as a hidden layer: the input needs a gradient),
            "model" (Linear, ReLU, …, Linear: the seed network; data needs no gradient),
            "gated" (a gated block of a transformer: dims in → hidden for the gated op alone,
            in → hidden → out for the MLP block; the input needs a gradient), or
            "epoch" (one pass of the training loop over `samples` samples).
    pass_:  "fwd" (inference, under no_grad), "fwd+bwd", "step" (fwd+bwd+SGD) or "epoch".
    dims:   feature sizes in → … → out; batch is M.
    launch_bound: microsecond-sized calls, where launch overhead decides (also timed in a CUDA graph).
    activation: the layers' activation, a name from fastmlp.ACTIVATIONS ("relu": the seed's).
    """

    workload: str
    kind: str
    pass_: str
    dtype: str
    batch: int
    dims: Tuple[int, ...]
    samples: int = 0
    gpu_only: bool = False
    launch_bound: bool = False
    tags: Tuple[str, ...] = field(default=())
    activation: str = "relu"

    @property
    def shape(self) -> str:
        return f"{self.batch}x" + "->".join(str(d) for d in self.dims)

    @property
    def id(self) -> str:
        """Unique name, also the pytest-benchmark group: workload/shape/dtype/pass, then
        /activation unless it is relu (so the ReLU ids of earlier results stay the same)."""
        base = f"{self.workload}/{self.shape}/{self.dtype}/{self.pass_}"
        return base if self.activation == "relu" else f"{base}/{self.activation}"

    @property
    def cost(self) -> costs.Cost:
        if "narrow" in self.tags:
            return costs.fused_stack_cost(self.batch, self.dims, self.dtype, self.pass_)
        if self.kind == "gated":
            return costs.gated_cost(self.batch, self.dims, self.dtype, self.pass_)
        if self.kind == "epoch":
            steps = self.samples // self.batch
            return costs.mlp_cost(self.batch, self.dims, self.dtype, "step", False) * steps
        cost = costs.mlp_cost(self.batch, self.dims, self.dtype, self.pass_,
                              input_grad=self.kind == "layer")
        if self.pass_ != "fwd" and _saves_preact(self.activation):
            # Training saves the pre-activation Z besides Y (written once; backward reads Z
            # instead of Y, which costs.layer_backward already counts as one M x N read).
            hidden = sum(self.dims[1:])
            cost = cost + costs.Cost(0, costs.ELEMENT_BYTES[self.dtype] * self.batch * hidden)
        return cost


def _saves_preact(activation: str) -> bool:
    from fastmlp import activations

    row = activations.get(activation)
    return row.saves(row.default_alpha) == "preact"


def catalogue(device_type: str, full: bool = False, tiny: bool = False,
              dtypes: Optional[List[str]] = None) -> List[Case]:
    """Every case to run on `device_type` ("cuda" or "cpu"), in run order (seed workloads first).

    Default on CUDA: all shapes, all four precisions. Default on CPU: fp32 only, the seed
    workloads, the 1024 and skinny MLP shapes (a couple of minutes on two cores). full: on CPU add
    the 4096 shape and the half precisions. The gated rows (Llama-7B's MLP block, bf16) are
    GPU-only. tiny: the same structure at toy sizes, for tests. dtypes, if given, restricts the
    precisions.
    """
    on_gpu = device_type == "cuda"
    batch, dims, samples = (TINY_BATCH, TINY_DIMS, TINY_SAMPLES) if tiny else (
        SEED_BATCH, SEED_DIMS, SEED_SAMPLES)
    shapes = TINY_MLP_SHAPES if tiny else MLP_SHAPES
    if on_gpu:
        mlp_dtypes = list(DTYPES)
    else:
        # tf32 has no CPU meaning; half precisions on two CPU cores only when asked for.
        mlp_dtypes = ["fp32", "bf16", "fp16"] if full else ["fp32"]
    if dtypes:
        mlp_dtypes = [d for d in mlp_dtypes if d in dtypes] or [d for d in dtypes if d in DTYPES]

    cases: List[Case] = []
    if not dtypes or "fp32" in dtypes:
        for pass_ in ("fwd", "fwd+bwd"):
            cases.append(Case("seed-layer", "layer", pass_, "fp32", batch, dims[:2],
                              launch_bound=True, tags=("seed",)))
        for pass_ in ("fwd", "fwd+bwd", "step"):
            cases.append(Case("seed-model", "model", pass_, "fp32", batch, dims,
                              launch_bound=True, tags=("seed",)))
    if not dtypes or "fp32" in dtypes:
        # Before the MLP shapes: a run cut short by a time budget still has the seed workloads.
        cases.append(Case("seed-epoch", "epoch", "epoch", "fp32", batch, dims, samples=samples,
                          tags=("seed", "loop")))
    mlp_shapes = [(m, k, n, gpu_only) for m, k, n, gpu_only in shapes
                  if (on_gpu or not gpu_only) and (on_gpu or full or tiny or k < 4096)]
    for m, k, n, gpu_only in mlp_shapes:
        for dtype in mlp_dtypes:
            for pass_ in ("fwd", "fwd+bwd"):
                cases.append(Case("mlp-layer", "layer", pass_, dtype, m, (k, n),
                                  gpu_only=gpu_only, tags=("mlp",)))
    # Narrow MLPs (workload "narrow-mlp", kind "model": the data needs no gradient).
    if tiny:
        narrow = [TINY_NARROW]
    else:
        narrow = [(NARROW_GPU_BATCH if on_gpu else NARROW_CPU_BATCH, d) for d in NARROW_MLPS]
    narrow_dtypes = [d for d in mlp_dtypes if d in NARROW_DTYPES] or mlp_dtypes[:1]
    for n_batch, n_dims in narrow:
        for dtype in narrow_dtypes:
            for pass_ in ("fwd", "fwd+bwd"):
                cases.append(Case("narrow-mlp", "model", pass_, dtype, n_batch, n_dims,
                                  tags=("mlp", "narrow")))
    # The other activations last: a run cut short by its time budget keeps the ReLU rows. On CPU
    # only with --full (or --tiny, one shape): they are GPU measurements.
    if on_gpu or full or tiny:
        act_dtypes = [d for d in mlp_dtypes if d in ACTIVATION_DTYPES] or mlp_dtypes[:1]
        for m, k, n, gpu_only in (mlp_shapes[:1] if tiny else mlp_shapes):
            for activation in MLP_ACTIVATIONS:
                for dtype in act_dtypes:
                    for pass_ in ("fwd", "fwd+bwd"):
                        cases.append(Case("mlp-layer", "layer", pass_, dtype, m, (k, n),
                                          gpu_only=gpu_only, tags=("mlp", "activation"),
                                          activation=activation))
    # The gated rows last: runs cut short by a budget keep every row they had before. The
    # Llama-7B sizes take minutes per call on a CPU: GPU-only (python -m bench names them as not
    # run there); --tiny runs the same rows at toy sizes.
    if not dtypes or GATED_DTYPE in dtypes:
        gated_rows = [(TINY_GATED[0], ("fwd", "fwd+bwd"))] if tiny else (
            list(GATED_TOKENS) if on_gpu else [])
        dims3 = TINY_GATED[1] if tiny else LLAMA_7B_MLP
        for workload in GATED_WORKLOADS:
            dims = dims3[:2] if workload == "gated-linear" else dims3
            tags = ("gated", "packed") if workload.endswith("packed") else ("gated",)
            for tokens, passes in gated_rows:
                for pass_ in passes:
                    cases.append(Case(workload, "gated", pass_, GATED_DTYPE, tokens, dims,
                                      gpu_only=not tiny, tags=tags,
                                      activation=GATED_ACTIVATION))
    return cases


def gpu_only_cases(full: bool = False, tiny: bool = False,
                   dtypes: Optional[List[str]] = None) -> List[Case]:
    """The cases a CUDA run has and a CPU run leaves out for their size (gpu_only), for the
    report's list of what was not run on a CPU and why."""
    return [c for c in catalogue("cuda", full=full, tiny=tiny, dtypes=dtypes) if c.gpu_only]
