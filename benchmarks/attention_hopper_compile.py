"""Compile the Gluon Hopper forward for sm90 without a GPU (ahead of time), and report registers/spills/smem
(``--bwd``: the Gluon backward; ``--portable-bwd``: the portable Triton backward's K/V kernel).

Needs a Triton whose Gluon API matches the GPU image's (3.6): e.g. ``pip install --target /tmp/tri36 triton==3.6.0``
then ``PYTHONPATH=/tmp/tri36:$PWD python benchmarks/attention_hopper_compile.py [--ptx out.ptx] [--bwd]``. The kernel
cannot run here; this catches Gluon front-end/layout errors and register spills before spending device time.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from sigattn import hopper_fwd  # noqa: E402


def compile_fwd(D, varlen, config=None, dtype="bf16", probe=0):
    config = tuple(config or hopper_fwd.CONFIGS[D])
    BM, BN, ST, C, SIG, DEPTH = config + (0, 1)[len(config) - 4:]
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    desc = lambda rows: f"tensordesc<{dtype}[{rows},{D}],{gl.NVMMASharedLayout.get_default_for([rows, D], gdt)!r}>"  # noqa
    sig = {"q_desc": desc(BM // C), "k_desc": desc(BN), "v_desc": desc(BN), "O": f"*{dtype}", "SeqInfo": "*i32",
           "scale": "fp32", "bias": "fp32", "N": "i32", "H": "i32", "GROUP": "i32", "B": "i32", "NUM_M": "i32",
           "stride_ot": "i32"}
    const = dict(VARLEN=varlen, HAS_LENS=True, LOG_N_BIAS=True, FAST_SIGMOID=True, CLEAN_V=not varlen, BLOCK_M=BM,
                 BLOCK_N=BN, D=D, STAGES=ST, CONSUMERS=C, PROBE=probe, SIG=SIG, DEPTH=DEPTH)
    for k, v in const.items():
        sig[k] = "constexpr"
    src = GluonASTSource(hopper_fwd.hopper_fwd_kernel, sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8 if C == 1 else 4})


def compile_portable_bwd(D, varlen, BM, BN, warps, stages, tma, dtype="bf16"):
    """The portable backward's K/V kernel (sigattn/triton_bwd.py) for sm90, dQ by atomics or by TMA reductions."""
    from triton.compiler import ASTSource

    from sigattn import triton_bwd

    sig = {n: "i32" for n in triton_bwd.attn_bwd_kv_kernel.arg_names}
    sig.update({n: f"*{dtype}" for n in ("Q", "K", "V", "DO", "DK", "DV")})
    sig.update(DQ="*fp32", SeqInfo="*i32", scale="fp32", bias="fp32",
               DQd=f"tensordesc<fp32[{BM},{D}]>" if tma else "constexpr")
    const = dict(D=D, D_PAD=D, VARLEN=varlen, HAS_LENS=True, LOG_N_BIAS=True, CAUSAL=False, COMPUTE_DQ=True,
                 DQ_TMA=tma, DOT_FP32=False, FAST_SIGMOID=True, BLOCK_M=BM, BLOCK_N=BN)
    if not tma:
        const["DQd"] = None
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(triton_bwd.attn_bwd_kv_kernel, sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def resource_usage(k) -> str:
    """Registers/spills per function from ``cuobjdump -res-usage`` (Triton's bundled copy) on the cubin."""
    import os
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return " | ".join(line.strip() for line in out.splitlines() if "REG" in line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--ptx", type=Path)
    ap.add_argument("--config", help="BLOCK_M,BLOCK_N,STAGES,CONSUMERS (default: hopper_fwd.CONFIGS)")
    ap.add_argument("--bwd", action="store_true", help="the backward's kernels (sigattn/hopper_bwd.py; every dQ variant) instead")
    ap.add_argument("--kv-blocks", help="with --bwd: BLOCK_M,BLOCK_N of the kv kernel (default: hopper_bwd.KV_BLOCKS; "
                                        "e.g. 128,128 at --d 64)")
    ap.add_argument("--portable-bwd", action="store_true",
                    help="the portable backward's K/V kernel (sigattn/triton_bwd.py) over its autotune tiles, dQ by "
                         "atomics and by TMA reductions: registers, stack (spills), shared memory, global atomics")
    ap.add_argument("--tiles", nargs="+", metavar="BM,BN,WARPS,STAGES",
                    help="with --portable-bwd: these tiles instead of the autotune set (e.g. 32,256,8,3)")
    ap.add_argument("--layouts", nargs="+", choices=("padded", "varlen"), default=["padded", "varlen"])
    ap.add_argument("--dq", nargs="+", choices=("atomics", "tma"), default=["atomics", "tma"])
    args = ap.parse_args()
    if args.portable_bwd:
        import re

        from sigattn import triton_tuning

        for D in args.d:
            tiles = ([tuple(int(x) for x in t.split(",")) for t in args.tiles] if args.tiles else
                     [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                      for c in triton_tuning.BWD_CONFIGS[triton_tuning.size_class(D)]])
            for bm, bn, warps, stages in tiles:
                c = triton_tuning._cfg(bm, bn, warps, stages)
                for varlen in [layout == "varlen" for layout in args.layouts]:
                    for tma in [dq == "tma" for dq in args.dq]:
                        k = compile_portable_bwd(D, varlen, bm, bn, c.num_warps, c.num_stages, tma)
                        ptx = k.asm["ptx"]
                        print(f"portable bwd D={D} ({bm}, {bn}, {c.num_warps} warps, {c.num_stages} stages) "
                              f"{'varlen' if varlen else 'padded'} dQ by {'TMA' if tma else 'atomics'}: "
                              f"smem {k.metadata.shared} B; {resource_usage(k)}; global atomics "
                              f"{len(re.findall(r'atom[.]global|red[.]global', ptx))}, "
                              f"TMA reduces {ptx.count('cp.reduce.async.bulk.tensor')}", flush=True)
        return
    if args.bwd:
        from sigattn import hopper_bwd

        kv = tuple(int(x) for x in args.kv_blocks.split(",")) if args.kv_blocks else None

        for D in args.d:
            for varlen in (False, True):
                for atomic, overlap in ((False, 0), (False, 1), (False, 2), (True, 0), ("tma1", 0), ("tma2", 0)):
                    for name, k in hopper_bwd.compiled_for_sm90(D, varlen, atomic, overlap, kv_blocks=kv).items():
                        label = (f" (dQ by TMA, form {atomic[-1]})" if isinstance(atomic, str) else
                                 " (dQ atomic)" if atomic else f" overlap {overlap}")
                        print(f"bwd {name}{label} D={D} "
                              f"varlen={varlen}: smem {k.metadata.shared} B; {resource_usage(k)}")
        return
    for D in args.d:
        for varlen in (False, True):
            k = compile_fwd(D, varlen, tuple(int(x) for x in args.config.split(",")) if args.config else None)
            print(f"D={D} varlen={varlen}: smem {k.metadata.shared} B; {resource_usage(k)}")
            if args.ptx:
                args.ptx.with_suffix(f".d{D}{'v' if varlen else 'p'}.ptx").write_text(k.asm["ptx"])


if __name__ == "__main__":
    main()
