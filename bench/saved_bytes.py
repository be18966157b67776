"""python -m bench.saved_bytes: what each implementation of Llama-7B's MLP block keeps for backward.

Measured, not computed: each implementation's forward runs under
``torch.autograd.graph.saved_tensors_hooks``, whose pack hook sees every tensor autograd keeps
for the backward (the saved tensors of torch's own nodes, and what an autograd.Function saves
with ``save_for_backward``); the bytes of the distinct storages among them are added up. The
parameters are left out (they exist with or without training), and the block's input X is
counted apart (it is the previous layer's output: whether it would be kept anyway depends on
the model around the block). Two token counts give bytes = per-token bytes x tokens + a
constant (the constant is 0 when nothing weight-sized is saved), printed as a Markdown table.

How each runs (CPU; with a CUDA device, everything runs there for real):
  eager     bench.variants.LlamaStyleMLP (nn.Linear children, nn.SiLU), as Llama writes it
  compile   torch.compile of it (fullgraph, dynamic=False): inductor's partitioner decides what
            is saved (on a CPU, inductor's CPU backend decided)
  fastmlp   the bench's fastmlp variant of that block (fastmlp.GatedMLP.from_module, or the
            functional form), on the Triton backend. Its kernels cannot run at these sizes on
            a CPU (Triton's interpreter takes minutes per call), so on a CPU the forward runs
            under FakeTensorMode: the autograd code that saves is the kernels' path's own, and
            the registered ops' fake kernels give the shapes (tests/test_bench.py checks, at a
            small size, that this gives what the real kernels save)
  liger     Liger-Kernel's LigerSwiGLUMLP, where liger_kernel imports (on a CPU its Triton
            kernel then runs under the interpreter)

Tensors an autograd.Function keeps as plain ctx attributes are invisible to the hooks: fastmlp
keeps only the biases there (parameters; Llama has none).
"""

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

if "triton" not in sys.modules:
    # fastmlp's Triton backend on CPU tensors (the FakeTensor measurement) needs the
    # interpreter flag, which Triton reads once, at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

from bench.cases import GATED_ACTIVATION, LLAMA_7B_MLP  # noqa: E402

IMPLEMENTATIONS = ("eager", "compile", "fastmlp", "liger")
LABELS = {"eager": "eager torch (nn.Linear x3, nn.SiLU)",
          "compile": "torch.compile (inductor, fullgraph)",
          "fastmlp": "fastmlp (gated op + linear)",
          "liger": "Liger-Kernel LigerSwiGLUMLP"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MEASURE_AT = (8, 16)
DEFAULT_TOKENS = 4096


@dataclass
class Saved:
    """What one forward kept for backward: X's storage bytes (0 if X was not saved) and the
    other distinct storages' bytes, parameters excluded."""

    x_bytes: int
    other: List[int] = field(default_factory=list)

    @property
    def other_bytes(self) -> int:
        return sum(self.other)


def saved_for_backward(module: torch.nn.Module, x: torch.Tensor) -> Saved:
    """Run module(x) under a pack hook and add up the distinct storages it saw, the module's
    parameters left out, X's storage apart. The output is dropped only after counting, so no
    saved storage is freed (and its address reused) while the hook runs."""
    def key(t):
        return StorageWeakRef(t.untyped_storage()).cdata

    parameters = {key(p) for p in module.parameters()}
    x_key = key(x)
    seen: Dict[int, int] = {}

    def pack(t):
        k = key(t)
        if k not in parameters:
            seen.setdefault(k, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    saved = Saved(seen.pop(x_key, 0), sorted(seen.values(), reverse=True))
    del out
    return saved


@dataclass
class Measurement:
    """One implementation's bytes at two token counts, fitted as per_token x tokens + constant."""

    name: str
    method: str
    tokens: Tuple[int, int]
    runs: Tuple[Saved, Saved]
    itemsize: int
    error: Optional[str] = None  # why it was not measured

    def _fit(self, values: Tuple[int, int]) -> Tuple[float, float]:
        (t1, t2), (b1, b2) = self.tokens, values
        per_token = (b2 - b1) / (t2 - t1)
        return per_token, b1 - per_token * t1

    @property
    def x_per_token(self) -> float:
        return self._fit((self.runs[0].x_bytes, self.runs[1].x_bytes))[0]

    @property
    def other_per_token(self) -> float:
        return self._fit((self.runs[0].other_bytes, self.runs[1].other_bytes))[0]

    @property
    def constant(self) -> float:
        """Bytes that do not grow with the tokens (X's and the others' together)."""
        return (self._fit((self.runs[0].x_bytes, self.runs[1].x_bytes))[1]
                + self._fit((self.runs[0].other_bytes, self.runs[1].other_bytes))[1])

    def at(self, tokens: int) -> float:
        """Bytes saved at `tokens` tokens, X included."""
        return (self.x_per_token + self.other_per_token) * tokens + self.constant

    def described(self) -> str:
        """The saved storages besides X at the larger token count, as per-token widths:
        "X + 4 x [11008]" (a storage that is not a whole number of elements per token is shown
        in bytes)."""
        tokens, run = self.tokens[1], self.runs[1]
        widths: Dict[str, int] = {}
        for nbytes in run.other:
            per_token = nbytes / (tokens * self.itemsize)
            text = f"[{per_token:.0f}]" if per_token == int(per_token) else f"{nbytes} B"
            widths[text] = widths.get(text, 0) + 1
        parts = (["X"] if run.x_bytes else []) + [
            f"{n} x {w}" if n > 1 else w for w, n in widths.items()]
        return " + ".join(parts) or "nothing"


def _build(name: str, dims, dtype: torch.dtype, device: str, tokens: int):
    """(module, x) of implementation `name` at `tokens` tokens."""
    from bench import variants

    block = variants.LlamaStyleMLP(*dims, activation=GATED_ACTIVATION, device=device, dtype=dtype)
    x = torch.randn(tokens, dims[0], device=device, dtype=dtype, requires_grad=True)
    if name == "eager":
        return block, x
    if name == "compile":
        torch._dynamo.reset()
        return torch.compile(block, fullgraph=True, dynamic=False), x
    if name == "fastmlp":
        return variants.fastmlp_block(block, GATED_ACTIVATION)[0], x
    if name == "liger":
        return variants.liger_mlp(block), x
    raise ValueError(f"unknown implementation {name!r}; expected one of {IMPLEMENTATIONS}")


def measure(name: str, dims: Sequence[int] = LLAMA_7B_MLP, dtype: str = "bf16",
            device: str = "cpu", measure_at: Tuple[int, int] = DEFAULT_MEASURE_AT,
            fake: Optional[bool] = None) -> Measurement:
    """Implementation `name` measured at the two token counts `measure_at`. fake (fastmlp
    only; default: on a CPU) runs the forward under FakeTensorMode on fastmlp's Triton
    backend; fake=False runs it for real (on a CPU: the kernels under the interpreter)."""
    import fastmlp

    torch_dtype = DTYPES[dtype]
    if fake is None:
        fake = name == "fastmlp" and device == "cpu"
    method = ("FakeTensorMode, Triton backend (kernels' autograd path, shapes from the ops' "
              f"fake kernels), {device}" if fake else f"forward run on {device}")
    if name == "liger":
        from bench.variants import liger_import_error

        why = liger_import_error()
        if why is not None:
            return Measurement(name, method, measure_at, (Saved(0), Saved(0)),
                               torch_dtype.itemsize, error=why)
    runs = []
    if name == "liger":
        # Optional, and its kernels are written for CUDA: a failure here is reported in the
        # table (on a CPU, Triton's interpreter may not run them), never a lost table.
        try:
            for tokens in measure_at:
                module, x = _build(name, dims, torch_dtype, device, tokens)
                runs.append(saved_for_backward(module, x))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return Measurement(name, method, measure_at, (Saved(0), Saved(0)),
                               torch_dtype.itemsize,
                               error=f"its forward failed on {device} ({type(exc).__name__}: "
                                     f"{first})")
        return Measurement(name, method, tuple(measure_at), tuple(runs), torch_dtype.itemsize)
    for tokens in measure_at:
        torch.manual_seed(0)
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(), fastmlp.use_backend("triton"):
                module, x = _build(name, dims, torch_dtype, device, tokens)
                runs.append(saved_for_backward(module, x))
        else:
            backend = "triton" if name == "fastmlp" else fastmlp.get_backend()
            with fastmlp.use_backend(backend):
                module, x = _build(name, dims, torch_dtype, device, tokens)
                runs.append(saved_for_backward(module, x))
        del module, x
    return Measurement(name, method, tuple(measure_at), tuple(runs), torch_dtype.itemsize)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}"


def markdown(measurements: List[Measurement], dims, dtype: str, tokens: int) -> str:
    """The table: per implementation what it saves, bytes per token without and with X, MiB
    at `tokens` tokens with X, and how it was measured."""
    k, h, n = dims
    at = measurements[0].tokens if measurements else DEFAULT_MEASURE_AT
    lines = [
        f"Saved for backward by the gated MLP block {k} -> {h} -> {n} (SwiGLU, no biases, "
        f"{dtype}), measured at {at[0]} and {at[1]} tokens (`python -m bench.saved_bytes`); "
        f"parameters not counted; X = the block's input [T, {k}].",
        "",
        f"| implementation | saved per token | bytes/token, X excluded | bytes/token, X "
        f"included | MiB at {tokens} tokens, X included | measured by |",
        "|---|---|---|---|---|---|",
    ]
    for m in measurements:
        if m.error:
            lines.append(f"| {LABELS[m.name]} | not measured: {m.error} | — | — | — | — |")
            continue
        constant = f"; + {m.constant:,.0f} B not per token" if m.constant else ""
        lines.append(
            f"| {LABELS[m.name]} | {m.described()}{constant} | {m.other_per_token:,.0f} | "
            f"{m.x_per_token + m.other_per_token:,.0f} | {_mib(m.at(tokens))} | {m.method} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.saved_bytes",
                                description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs=3, default=list(LLAMA_7B_MLP),
                   metavar=("IN", "HIDDEN", "OUT"), help="block sizes (default Llama-7B's)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help="token count of the table's MiB column")
    p.add_argument("--measure-at", type=int, nargs=2, default=list(DEFAULT_MEASURE_AT),
                   metavar=("T1", "T2"), help="the two token counts measured")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--only", action="append", choices=IMPLEMENTATIONS, default=[],
                   help="measure only these implementations (repeatable)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    return p.parse_args(argv)


def main(argv=None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if args.measure_at[0] == args.measure_at[1]:
        raise SystemExit("--measure-at needs two different token counts")
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    names = [n for n in (args.only or IMPLEMENTATIONS)
             if not (args.no_compile and n == "compile")]
    results = [measure(n, args.dims, args.dtype, device, tuple(args.measure_at)) for n in names]
    out(markdown(results, args.dims, args.dtype, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
