"""benchmarks/stress_attention.py: finds a call that differs from the first or holds NaN, and runs end to end on
the CPU (Triton interpreter, tiny shapes; no rates asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import stress_attention  # noqa: E402


def _flaky(bad_calls, nan=False):
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(40, 2, 8, generator=g) for _ in range(4)]
    n = [0]

    def fn():
        n[0] += 1
        out = dict(zip(("out", "dq", "dk", "dv"), (t.clone() for t in ref)))
        if n[0] in bad_calls:
            out["dk"][17, 1, 3] = float("nan") if nan else out["dk"][17, 1, 3] + 1e-3   # dK, row 17
        out["dq"] += 1e-6 * torch.randn(out["dq"].shape, generator=g)                 # dQ: any order of adds
        return out
    return fn


def test_unwritten_rows_read_the_poison():
    # a "kernel" that leaves its output's last row unwritten: the poisoned allocator hands it NaN, so it counts
    shape = (40, 2, 8)

    def lazy():
        out = torch.empty(shape, dtype=torch.bfloat16)
        out[:-1] = 1.0
        return {"out": out, "dk": out.clone()}
    s = stress_attention.run_case(lazy, seconds=0.1, poison=stress_attention.poisoner(shape, "cpu"))
    assert s["ref_nonfinite"] > 0 or s["nonfinite_calls"] > 0


def test_a_call_that_differs_or_holds_nan_is_counted():
    s = stress_attention.run_case(_flaky(set()), seconds=0.2)
    assert s["calls"] > 3 and s["mismatch_calls"] == s["nonfinite_calls"] == s["dq_far_calls"] == 0
    assert s["first"] is None
    s = stress_attention.run_case(_flaky({3, 5}), seconds=0.2)
    assert s["mismatch_calls"] == 2 and s["nonfinite_calls"] == 0
    assert s["first"] == {"call": 3, "rows": {"dk": [17]}, "nonfinite": False, "dq_far": False}
    s = stress_attention.run_case(_flaky({4}, nan=True), seconds=0.2)
    assert s["mismatch_calls"] == 1 and s["nonfinite_calls"] == 1 and s["first"]["rows"] == {"dk": [17]}


def test_stress_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "stress.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stress_attention.py"), "--device", "cpu",
                        "--seconds", "0.3", "--cells", "3", "--max-len", "33", "--cases", "op:varlen:16:2",
                        "portable:padded:16:2", "encoder:tiny", "--fill-uninitialized", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert {"device", "commit", "date", "load", "cases"} <= set(res) and res["device"] == "cpu"
    assert res["fill_uninitialized"] is True
    assert [(c["kernel"], c["layout"]) for c in res["cases"]] == [("op", "varlen"), ("portable", "padded"),
                                                                   ("encoder", "tiny")]
    assert all(c["calls"] >= 2 and c["mismatch_calls"] == 0 and c["ref_nonfinite"] == 0 for c in res["cases"])


def test_an_encoder_that_leaves_rows_unwritten_is_caught_under_the_fill(monkeypatch):
    """--fill-uninitialized: torch.empty reads NaN, so a model whose output skips rows fails on every call."""
    fn, shape = stress_attention.make_encoder_case("tiny", cells=3, max_len=33, seed=0, device="cpu")
    assert all(bool(torch.isfinite(t).all()) for t in fn().values())
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        def skips_a_row():
            out = fn()
            m = torch.empty_like(out["mean"])
            m[1:] = out["mean"][1:]
            return out | {"mean": m}
        s = stress_attention.run_case(skips_a_row, seconds=0.1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert s["ref_nonfinite"] > 0


def test_bad_case_names_are_refused_clearly():
    for bad in ("encoder:9b", "op:ragged:64:12", "op:varlen:64"):
        try:
            stress_attention.parse_case(bad)
        except SystemExit as e:
            assert "kernel:layout:D:H" in str(e) and repr(bad) in str(e)
        else:
            raise AssertionError(bad)
    assert stress_attention.parse_case("encoder:160m") == ("encoder", "160m", 64, 12)
