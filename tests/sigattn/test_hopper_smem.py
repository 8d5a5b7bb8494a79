"""The Hopper kernels' shared-memory layout, built for sm90 ahead of time (no GPU needed): every mbarrier a kernel
initialises is used after its init and shares no bytes with another buffer or a layout conversion's scratch.

Why: the PTX ISA makes any non-mbarrier access to an initialised, not invalidated, mbarrier undefined, and Triton's
allocator hands the bytes of a barrier with no use after its ``init`` to later buffers. The forward initialised two
barriers its default configs never use (``turn``, ``v_clean``); their bytes were the start of the epilogue's
conversion scratch, and rows 0-1 of some query tiles came out NaN now and then (H200, ``stress_attention.py
--fill-uninitialized``, D = 128 varlen: 47 of 156 calls; 0 after the fix).

The kernels are Gluon for the GPU image's Triton (3.6), whose Gluon API differs from the CPU venv's newer Triton:
``make test`` installs Triton 3.6 into ``.venv/triton-sm90`` and the checks run there in a subprocess
(``benchmarks/attention_hopper_compile.py --barriers``); with Triton 3.6 itself (the GPU image) they run in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_TRITON = ROOT / ".venv" / "triton-sm90"
SCRIPT = ROOT / "benchmarks" / "attention_hopper_compile.py"


def _in_process() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return triton.__version__.startswith("3.6")


def _check(fwd_source: Path | None = None) -> dict:
    if _in_process():
        sys.path.insert(0, str(ROOT))
        from benchmarks.attention_hopper_compile import check_barriers

        return check_barriers(fwd_source)
    if not (GPU_TRITON / "triton").is_dir():
        pytest.skip(f"needs Triton 3.6 (the GPU image's Gluon API): `make test` installs it into {GPU_TRITON}")
    env = dict(os.environ, PYTHONPATH=f"{GPU_TRITON}{os.pathsep}{ROOT}")
    cmd = [sys.executable, str(SCRIPT), "--barriers"] + (["--fwd-source", str(fwd_source)] if fwd_source else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layouts():
    return _check()


def test_every_hopper_kernel_s_barriers_own_their_bytes(layouts):
    fwd = [c for c in layouts if c.startswith("fwd")]
    bwd = [c for c in layouts if c.startswith("bwd")]
    assert len(fwd) == 10 and len(bwd) >= 12, sorted(layouts)
    for case, got in layouts.items():
        assert got["used_barriers"] >= 2, f"{case}: the layout parse found no used barriers"
        assert got["problems"] == [], case
    assert all(layouts[c]["scratch"] >= 1 for c in fwd), "the forward's epilogue scratch was not found"


H100_SMEM = 227 * 1024        # the most dynamic shared memory one CTA may have on sm90


def test_the_default_forward_fits_and_does_not_spill(layouts):
    """The configs the ops run (hopper_fwd.CONFIGS) within sm90's shared memory and with no register spills: a
    change that makes ptxas spill (stack > 0) costs the forward 10-30 % and shows only on a GPU otherwise."""
    default = [c for c in layouts if c.startswith("fwd") and " default " in c]
    assert len(default) == 4
    for case in default:
        assert layouts[case]["shared"] <= H100_SMEM, case
        assert layouts[case]["stack"] == 0, case


def test_the_check_fails_on_the_forward_as_it_was(tmp_path):
    """The check can fail: the forward with ``v_clean`` initialised whatever the layout (as before the fix)."""
    src = (ROOT / "sigattn" / "hopper_fwd.py").read_text()
    old = src.replace("        if CLEAN_V:\n            mbarrier.init(v_clean", "        if True:\n            mbarrier.init("
                      "v_clean", 1)
    assert old != src
    (tmp_path / "hopper_fwd_as_it_was.py").write_text(old)
    got = _check(tmp_path / "hopper_fwd_as_it_was.py")
    varlen = [c for c in got if c.endswith("varlen")]
    assert varlen and all("%v_clean is initialised and never used" in got[c]["problems"] for c in varlen), got
    assert not any(got[c]["problems"] for c in got if c.endswith("padded"))   # the padded layout uses v_clean


def test_offline_builds_pipeline_their_loads_as_the_jit_s_do():
    """The offline build carries the JIT's alignment hints (``aligned_attrs``): without them the portable backward's
    Q/dO tiles went global → registers → shared (no ``cp.async``, LDGSTS 0) and its register and spill figures were
    another kernel's (session 19's)."""
    import ast

    if not _in_process() and not (GPU_TRITON / "triton").is_dir():
        pytest.skip(f"needs Triton 3.6: `make test` installs it into {GPU_TRITON}")
    env = dict(os.environ, PYTHONPATH=f"{GPU_TRITON}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, str(SCRIPT), "--portable-bwd", "--d", "64", "--layouts", "varlen", "--dq", "tma",
                        "--tiles", "64,128,8,3", "--sass"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sass = ast.literal_eval(r.stdout.strip().splitlines()[-1].split("; SASS ", 1)[1])
    assert sass["HGMMA"] > 0 and sass["LDGSTS"] > 0, sass
    assert sass["MUFU"] >= 64, sass     # one per score: 32 per thread in each of the two loop bodies
