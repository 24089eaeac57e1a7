"""Compiles dupfast's Triton kernels ahead of time for sm_80 and sm_90 without a GPU.

Run as a script (TRITON_INTERPRET must be unset, so the kernels are real @triton.jit functions);
test_triton_aot.py runs it in a subprocess. triton.compile with a GPUTarget goes through Triton's
MLIR passes and the bundled ptxas, so this catches what the interpreter accepts but the GPU compiler
rejects (it found that fp64 tl.dot cannot take operands widened from bf16 loads). Prints one line per
kernel variant; exit status 1 if any failed.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dupfast.ops import kl_triton, mahalanobis_triton, transitions_triton  # noqa: E402

MAHA_SIG = {"x_ptr": None, "s_n": "i64", "s_l": "i64", "w_ptr": "*fp32", "mu0_ptr": "*fp32", "shift_ptr": "*fp32",
            "lower_ptr": "*i32", "layers_ptr": "*i64", "out_ptr": "*fp32", "N": "i32", "D": "i32", "K": "i32",
            "NSEL": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "KP": "constexpr",
            "SQUARED": "constexpr", "REDUCE_MIN": "constexpr"}
TRANS_SIG = {"x_ptr": None, "s_n": "i64", "s_l": "i64", "gram_ptr": "*fp32", "cos_ptr": "*fp32", "conc_ptr": "*fp32",
             "L": "i32", "D": "i32", "LP": "constexpr", "BLOCK_D": "constexpr", "MAX_SWEEPS": "constexpr",
             "OFF_TOL2": "constexpr", "GRAM_DOT": "constexpr"}
KL_SIG = {"s_ptr": None, "t_ptr": None, "w_ptr": "*fp32", "loss_ptr": "*fp32", "g_ptr": None, "V": "i32",
          "inv_t": "fp32", "grad_scale": "fp32", "HAS_WEIGHTS": "constexpr", "GRAD_BF16": "constexpr",
          "BLOCK": "constexpr"}
# (student, teacher) dtypes, weights, block: kl_div's three same-dtype pairs, and a bf16 student under an fp32
# teacher (linear_kl_div's Triton backend runs this kernel on bf16 logits against fp32 teacher logits / top-k);
# the masked-row branch (HAS_WEIGHTS) and both launch geometries (block <= 1024: 4 warps, 4096: 8) each appear
KL_CASES = (("fp32", "fp32", False, 1024), ("bf16", "bf16", True, 4096), ("fp16", "fp16", True, 1024),
            ("bf16", "fp32", False, 4096))


def variants(archs, layer_pads):
    for arch in archs:
        for xdt in ("*fp32", "*bf16"):
            sig = dict(MAHA_SIG, x_ptr=xdt)
            for reduce_min in (True, False):
                yield (f"mahalanobis sm_{arch} {xdt[1:]} reduce_min={reduce_min}",
                       mahalanobis_triton._mahalanobis_kernel, sig,
                       dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, KP=2, SQUARED=False, REDUCE_MIN=reduce_min), arch, 4)
            sig = dict(TRANS_SIG, x_ptr=xdt)
            for lp in layer_pads:
                dot = xdt == "*fp32"
                consts = dict(LP=lp, BLOCK_D=32 if dot else max(1, 8192 // (lp * lp)),
                              MAX_SWEEPS=transitions_triton.MAX_SWEEPS, OFF_TOL2=transitions_triton.OFF_TOL2,
                              GRAM_DOT=dot)
                yield (f"layer_transitions sm_{arch} {xdt[1:]} LP={lp}", transitions_triton._transitions_kernel, sig,
                       consts, arch, 8 if lp >= 64 else 4)
        for sdt, tdt, has_w, block in KL_CASES:  # the gradient is stored in the student's dtype
            sig = dict(KL_SIG, s_ptr="*" + sdt, t_ptr="*" + tdt, g_ptr="*" + sdt)
            consts = dict(HAS_WEIGHTS=has_w, GRAD_BF16=sdt == "bf16", BLOCK=block)
            yield (f"kl_rows sm_{arch} {sdt}/{tdt} weights={has_w} BLOCK={block}", kl_triton._kl_rows_kernel, sig,
                   consts, arch, 4 if block <= 1024 else 8)


def main(argv):
    archs = [int(a) for a in (argv[1].split(",") if len(argv) > 1 else ["80", "90"])]
    pads = [int(p) for p in (argv[2].split(",") if len(argv) > 2 else ["16", "64"])]
    failed = 0
    for name, fn, sig, consts, arch, warps in variants(archs, pads):
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            print(f"ok   {name}: cubin {len(k.asm['cubin'])} bytes, shared memory {k.metadata.shared} bytes",
                  flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL {name}: {str(exc).strip().splitlines()[-1][:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
