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
from sigattn.hopper_bwd import aligned_attrs  # noqa: E402


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
    src = GluonASTSource(hopper_fwd.hopper_fwd_kernel, sig, constexprs=const,
                         attrs=aligned_attrs(hopper_fwd.hopper_fwd_kernel, sig))
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
    src = ASTSource(triton_bwd.attn_bwd_kv_kernel, sig, constexprs=const,
                    attrs=aligned_attrs(triton_bwd.attn_bwd_kv_kernel, sig))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


_BYTES = {"i1": 1, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8,
          "f8E4M3FN": 1, "f8E5M2": 1}


def shared_layout(k) -> list:
    """Where the shared-memory allocator put each buffer of a compiled kernel ``k`` (Triton's own
    AllocateSharedMemory pass re-run on its TTGIR) and which are mbarriers the kernel uses:
    ``[{name, op, offset, size, barrier, used}]``. ``size``: exact for ``local_alloc`` buffers, 1 byte (the
    start) for an op's scratch (its extent is not in the IR); ``barrier``: ``init_barrier`` runs on it or a view of
    it; ``used``: something other than that init reads it (a wait, arrive, TMA load, or a warp_specialize capture)."""
    import re
    import tempfile

    from triton._C.libtriton import ir, nvidia, passes

    ctx = ir.context()
    ir.load_dialects(ctx)
    nvidia.load_dialects(ctx)
    with tempfile.NamedTemporaryFile("w", suffix=".ttgir") as f:
        f.write(k.asm["ttgir"])
        f.flush()
        mod = ir.parse_mlir_module(f.name, ctx)
    pm = ir.pass_manager(ctx)          # make_llir's passes up to and including the allocation (Triton 3.6)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, 90, 87)
    pm.run(mod, "shared_layout")
    lines = str(mod).splitlines()

    bufs, root = [], {}
    for line in lines:
        a = re.search(r"(%[\w.]+) = ttg\.local_alloc\b[^{]*\{[^}]*allocation\.offset = (\d+) : i32[^}]*\}.*?"
                      r"-> !ttg\.memdesc<([\dx]+)x(\w+),", line)
        if a:
            size = _BYTES[a[4]]
            for d in a[3].split("x"):
                size *= int(d)
            root[a[1]] = a[1]
            bufs.append(dict(name=a[1], op="local_alloc", offset=int(a[2]), size=size, barrier=False, used=False))
            continue
        o = re.search(r"(?:(%[\w.]+) = )?([\w.]+)\b[^{]*\{[^}]*allocation\.offset = (\d+) : i32", line)
        if o and "tt.func" not in line:
            bufs.append(dict(name=o[1] or o[2], op=o[2], offset=int(o[3]), size=1, barrier=False, used=False))
        v = re.search(r"(%[\w.]+) = ttg\.memdesc_\w+ (%[\w.]+)", line)
        if v and v[2] in root:
            root[v[1]] = root[v[2]]
    by_name = {b["name"]: b for b in bufs if b["op"] == "local_alloc"}
    for line in lines:
        if "ttg.local_alloc" in line or re.search(r"= ttg\.memdesc_\w+ ", line):
            continue
        init = "ttng.init_barrier" in line
        for name in set(re.findall(r"%[\w.]+", line)) & root.keys():
            b = by_name[root[name]]
            b["barrier" if init else "used"] = True
    return bufs


def barrier_problems(bufs: list) -> list:
    """What breaks the rule that an initialised mbarrier owns its bytes until it is invalidated (PTX ISA; any other
    access to them is undefined): a barrier the kernel initialises but never uses (the allocator ends its life at
    the init and gives its bytes to later buffers or scratch), or one whose bytes another buffer's overlap. Not
    caught: a barrier used for a while and then dead, under scratch that starts below it (the IR gives a scratch's
    start, not its extent); in these kernels every used barrier is live to the end (the persistent loop, or a
    warp_specialize capture). Triton 3.6 also has a run-time sanitizer of shared-memory accesses
    (``TRITON_INSTRUMENTATION_MODE=consan``), not tried on these kernels yet. ``bufs``: ``shared_layout(k)``."""
    out = [f"{b['name']} is initialised and never used" for b in bufs if b["barrier"] and not b["used"]]
    out += [f"{b['name']} shares bytes with {o['name']} ({o['op']})" for b in bufs if b["barrier"] for o in bufs
            if o is not b and o["offset"] < b["offset"] + b["size"] and b["offset"] < o["offset"] + o["size"]]
    return out


# What check_barriers builds: the forward's configs (D 64/128 defaults, two-consumer ping-pong on mbarriers and on
# named barriers, a D = 64 variant) and the Gluon backward's kernels (dQ pass and dQ by TMA), both layouts.
BARRIER_FWD = [(64, None), (128, None), (128, (128, 64, 3, 2, 3, 3)), (128, (128, 64, 4, 2, 3, 4)),
               (64, (128, 128, 3, 1, 3, 1))]


def check_barriers(fwd_source: Path | None = None) -> dict:
    """``{case: {problems, used_barriers, scratch, shared, stack}}`` (shared-memory bytes; stack bytes per thread,
    i.e. register spills, from cuobjdump) for every kernel of BARRIER_FWD and the backward (see
    ``barrier_problems``); ``fwd_source``: take the forward kernel from another file (e.g. an older
    sigattn/hopper_fwd.py), to show the check fails on it."""
    import importlib.util
    import re

    from sigattn import hopper_bwd

    shipped = hopper_fwd.hopper_fwd_kernel
    if fwd_source is not None:    # only for the builds below: a test process may go on to run the shipped kernel
        spec = importlib.util.spec_from_file_location("hopper_fwd_other", fwd_source)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        hopper_fwd.hopper_fwd_kernel = mod.hopper_fwd_kernel
    kernels = {}
    try:
        for varlen in (False, True):
            layout = "varlen" if varlen else "padded"
            for D, config in BARRIER_FWD:
                kernels[f"fwd D={D} {config or 'default'} {layout}"] = compile_fwd(D, varlen, config)
            if fwd_source is None:
                for D in (64, 128):
                    for dq in (False, "tma1"):
                        for name, k in hopper_bwd.compiled_for_sm90(D, varlen, dq).items():
                            kernels[f"bwd {name} D={D} dq={dq or 'pass'} {layout}"] = k
    finally:
        hopper_fwd.hopper_fwd_kernel = shipped
    out = {}
    for case, k in kernels.items():
        bufs = shared_layout(k)
        stack = re.search(r"STACK:(\d+)", resource_usage(k))
        out[case] = {"problems": barrier_problems(bufs), "used_barriers": sum(b["barrier"] and b["used"] for b in bufs),
                     "scratch": sum(b["op"] == "ttg.convert_layout" for b in bufs), "shared": k.metadata.shared,
                     "stack": int(stack[1]) if stack else None}
    return out


def _on_cubin(k, tool: str, *args: str) -> str:
    """stdout of one of Triton's bundled CUDA tools (``cuobjdump``, ``nvdisasm``) run on the kernel's cubin."""
    import os
    import subprocess
    import tempfile

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        return subprocess.run([str(exe), *args, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def resource_usage(k) -> str:
    """Registers/spills per function from ``cuobjdump -res-usage`` (Triton's bundled copy) on the cubin."""
    return " | ".join(line.strip() for line in _on_cubin(k, "cuobjdump", "-res-usage").splitlines() if "REG" in line)


SASS_OPS = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "F2FP", "LDGSTS", "LDG", "STL", "LDL")


def sass_counts(k) -> dict[str, int]:
    """How many of each SASS opcode in ``SASS_OPS`` the kernel holds (``nvdisasm``; every loop body once): the
    tensor-core, MUFU and FMA-pipe instructions, cp.async loads and plain ones, spill stores and loads."""
    import re

    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", _on_cubin(k, "nvdisasm", "-c"))
    return {op: ops.count(op) for op in SASS_OPS}


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
    ap.add_argument("--sass", action="store_true", help="with --portable-bwd: also count SASS opcodes (sass_counts)")
    ap.add_argument("--barriers", action="store_true",
                    help="check the shared-memory layout of every Hopper kernel (check_barriers): JSON on stdout")
    ap.add_argument("--fwd-source", type=Path, help="with --barriers: the forward kernel from this file instead")
    args = ap.parse_args()
    if args.barriers:
        import json

        print(json.dumps(check_barriers(args.fwd_source)))
        return
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
                        n_atomics = len(re.findall(r"\b(?:atom|red)[.]global", ptx))   # not cp.async's "shared.global"
                        print(f"portable bwd D={D} ({bm}, {bn}, {c.num_warps} warps, {c.num_stages} stages) "
                              f"{'varlen' if varlen else 'padded'} dQ by {'TMA' if tma else 'atomics'}: "
                              f"smem {k.metadata.shared} B; {resource_usage(k)}; global atomics "
                              f"{n_atomics}, "
                              f"TMA reduces {ptx.count('cp.reduce.async.bulk.tensor')}"
                              + (f"; SASS {sass_counts(k)}" if args.sass else ""), flush=True)
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
            print(f"D={D} varlen={varlen}: smem {k.metadata.shared} B; {resource_usage(k)}; barrier "
                  f"problems: {barrier_problems(shared_layout(k)) or 'none'}")
            if args.ptx:
                args.ptx.with_suffix(f".d{D}{'v' if varlen else 'p'}.ptx").write_text(k.asm["ptx"])


if __name__ == "__main__":
    main()
