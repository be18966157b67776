"""Ahead-of-time compile of the gated kernels (kernels/gated.py) for sm_80 / sm_90, without a GPU.

The same check as kernels/aot.py (whose compile reports it reads: registers, spills, stack,
shared memory, HGMMA count, wgmma waits, NaN-dropping min/max), for the three gated kernels.
Each compile mirrors a launch on contiguous, 16-byte-aligned tensors (unit strides constexpr 1,
the other integers divisible by 16, the batch dimension unspecialised where the kernel says so);
the weights' strides are the packed halves' too (``w[:H]``, ``w[H:]`` of a contiguous [2H, K]
weight have the same strides as two separate weights, and an offset H * K elements, 16-byte
aligned whenever H * K is a multiple of 8).

``python -m fastmlp.kernels.gated_aot`` compiles the default config of every shipped gated list
with silu (the heaviest derivative of the gated activations) and prints a line per case;
``--all`` every config of every list with every activation (long).
"""

import argparse
import json
import sys

import triton.language as tl

from fastmlp.kernels import activations, configs, gated
from fastmlp.kernels.activation_jit import forward_of, grad_of
from fastmlp.kernels.aot import CompileReport, compile_and_read

# Per kernel: the kernel, its block constexprs for (rows, cols, reduction), the strides that are
# 1 for contiguous operands, the constexpr flags of the heaviest variant, and the unspecialised
# integers.
_KERNELS = {
    "gated_forward": (gated.gated_fwd_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                      ("stride_xk", "stride_wgk", "stride_wuk", "stride_bg", "stride_bu",
                       "stride_yn"),
                      dict(HAS_GATE_BIAS=True, HAS_UP_BIAS=True, SAVE=True), ("M",)),
    "gated_grad_input": (gated.gated_grad_input_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                         ("stride_gn", "stride_wgk", "stride_wuk", "stride_dxk"), dict(), ("M",)),
    "gated_grad_weight": (gated.gated_grad_weight_kernel, ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
                          ("stride_gn", "stride_xk", "stride_dwk"),
                          dict(COMPUTE_DWG=True, COMPUTE_DBG=True, COMPUTE_DWU=True,
                               COMPUTE_DBU=True), ()),
}

_PLANS = {"gated_tensor_core_sm90": (90, "bf16", "ieee"),
          "gated_dw_tensor_core_sm90": (90, "bf16", "ieee"),
          "gated_tensor_core_sm80": (80, "bf16", "ieee"),
          "gated_tf32": (90, "fp32", "tf32"), "gated_ieee_fp32": (90, "fp32", "ieee")}


def _serves(plan: str, kernel: str) -> bool:
    """Whether a list serves a kernel on its GPU (configs.gated_candidates: Hopper's 16-bit dW
    has a list of its own)."""
    if plan == "gated_dw_tensor_core_sm90":
        return kernel == "gated_grad_weight"
    return not (plan == "gated_tensor_core_sm90" and kernel == "gated_grad_weight")


def compile_gated(kernel: str, arch: int, dtype: str, precision: str, config,
                  activation: str = "silu") -> CompileReport:
    """Compile one gated kernel with one config and activation for sm_<arch>."""
    fn, block_names, unit_strides, flags, unspecialized = _KERNELS[kernel]
    row = activations.get(activation)
    alpha = row.default_alpha
    constexprs = dict(flags, ALPHA=alpha, ACC_DTYPE=tl.float32, DOT_PRECISION=precision,
                      UPCAST=False, OFFSET_DTYPE=tl.int32, GROUP=config.group,
                      ACTIVATION=forward_of(activation))
    if kernel != "gated_forward":
        constexprs.update(ACTIVATION_GRAD=grad_of(activation),
                          SAVES_OUTPUT=row.saves(alpha) == "output")
    constexprs.update(zip(block_names, (config.block_rows, config.block_cols, config.block_red)))
    constexprs.update({name: 1 for name in unit_strides})
    report = compile_and_read(fn, constexprs, dtype, arch, config, unspecialized)
    return CompileReport(kernel, arch, dtype, precision, config, *report,
                         activation=activation)


def default_cases(activation: str = "silu"):
    """(kernel, arch, dtype, precision, config, activation): the default config of each list."""
    cases = []
    for name, (arch, dtype, precision) in _PLANS.items():
        config = configs.all_gated_configs()[name][0]
        for kernel in _KERNELS:
            if not _serves(name, kernel) or (kernel != "gated_forward" and not activations.get(
                    activation).fuses_backward_on((arch // 10, 0))):
                continue   # another list, or TORCH_GEMM there (configs.gated_candidates)
            cases.append((kernel, arch, dtype, precision, config, activation))
    return cases


def all_cases():
    cases = []
    for name, (arch, dtype, precision) in _PLANS.items():
        for config in configs.all_gated_configs()[name]:
            for activation in activations.ACTIVATIONS:
                for kernel in _KERNELS:
                    if not _serves(name, kernel) or (kernel != "gated_forward" and not activations.get(
                            activation).fuses_backward_on((arch // 10, 0))):
                        continue
                    cases.append((kernel, arch, dtype, precision, config, activation))
    return cases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--case", action="append",
                        help="kernel,arch,dtype,precision: that list's default config with silu "
                             "(repeatable)")
    parser.add_argument("--json", help="write the reports here")
    args = parser.parse_args(argv)
    if args.case:
        cases = []
        for text in args.case:
            kernel, arch, dtype, precision = text.split(",")
            plan = [n for n, p in _PLANS.items()
                    if p == (int(arch), dtype, precision) and _serves(n, kernel)][0]
            cases.append((kernel, int(arch), dtype, precision,
                          configs.all_gated_configs()[plan][0], "silu"))
    else:
        cases = all_cases() if args.all else default_cases()
    reports = []
    for case in cases:
        r = compile_gated(*case)
        reports.append(r)
        c = r.config
        print(f"{r.kernel:18s} {r.activation:10s} sm{r.arch} {r.dtype} {r.precision:4s} "
              f"{c.block_rows}x{c.block_cols}x{c.block_red} w{c.num_warps} s{c.num_stages}: "
              f"{r.registers} regs, {r.spill_bytes} B spilled, {r.shared_bytes} B shared, "
              f"{r.hgmma} HGMMA, waits {r.wgmma_waits}, minmax {r.float_minmax}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(vars(r), config=vars(r.config)) for r in reports], f)


if __name__ == "__main__":
    sys.exit(main())
