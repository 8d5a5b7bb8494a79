"""--context-parallel in launch.submit (checked, passed through as parallel.context_parallel_degree) and in the
memory model / projection (activations ÷ P, all-to-all bytes)."""

from __future__ import annotations

import json
import random

import pytest

from launch import project, submit
from launch.memory import activation_bytes, cp_comm_bytes, feasibility
from launch.model_size import flops_per_cell, model_size


def _args(*extra):
    return submit.parse_args(["tiny", "optim.lr=0.001", "--gpus-per-node", "0", "--tasks-per-node", "2", *extra])


def test_submit_passes_the_degree_through_and_refuses_bad_ones():
    args = _args("--context-parallel", "2")
    _, jobs = submit.validate(args, use_slurm=False)
    assert jobs == [["optim.lr=0.001", "parallel.context_parallel_degree=2"]]
    for bad, msg in [("3", "divide the world size 2"), ("0", "must be >= 1")]:
        with pytest.raises(SystemExit, match=msg):
            submit.validate(_args("--context-parallel", bad), use_slurm=False)
    args = submit.parse_args(["tiny", "model.n_heads=2", "--gpus-per-node", "0", "--tasks-per-node", "4",
                              "--context-parallel", "4"])
    with pytest.raises(SystemExit, match="degree=4 exceeds model.n_heads=2"):
        submit.validate(args, use_slurm=False)


def test_activations_per_gpu_divide_by_the_degree_and_comm_grows_with_it():
    m = model_size(random.choice(["160m", "1.4b"]))
    s = random.choice([8192, 32768, 65536])
    base = feasibility(m, s, 3, 4)
    for P in (2, 4):
        f = feasibility(m, s, 3, 4, context_parallel=P)
        assert f.model_state_gib == pytest.approx(base.model_state_gib)
        assert f.act_gib_per_cell == pytest.approx(activation_bytes(m, 1, s // P, False) / 2**30)
        assert f.act_gib_per_cell == pytest.approx(base.act_gib_per_cell / P, rel=1e-9)
        assert f.max_cells >= P * base.max_cells
    assert cp_comm_bytes(m, 1) == 0 < cp_comm_bytes(m, 2) < cp_comm_bytes(m, 4) < 16 * m.d_model * m.n_layers
    assert cp_comm_bytes(m, 4, checkpointing=True) == pytest.approx(1.5 * cp_comm_bytes(m, 4))
    with pytest.raises(ValueError, match="divide gpus=6"):
        feasibility(m, s, 3, 6, context_parallel=4)


def test_projection_rows_carry_the_degree(tmp_path, capsys):
    out = tmp_path / "p"
    assert project.main(["--sizes", "1.4b", "--context", "32768", "--gpus", "64", "--context-parallel", "4",
                         "--mfu", "0.4", "--attention", "sigmoid", "--out", str(out)]) == 0
    data = json.loads((out / "projection.json").read_text())
    (row,) = data["rows"]
    m = model_size("1.4b")
    assert row["context_parallel_degree"] == 4 == data["meta"]["context_parallel_degree"]
    assert row["cp_comm_gib_per_cell"] == pytest.approx(8192 * cp_comm_bytes(m, 4) / 2**30)
    assert "context_parallel_degree" in (out / "projection.md").read_text()
    with pytest.raises(SystemExit):
        project.main(["--gpus", "6", "--context-parallel", "4", "--out", str(tmp_path / "bad")])
    assert "--context-parallel 4 must be >= 1 and divide --gpus 6" in capsys.readouterr().err


def test_projection_charges_uneven_heads_on_the_attention_only():
    """160m has 12 heads: CP = 4 splits them evenly (balance 1), CP = 8 gives 2 or 1 heads per rank (balance 0.75),
    so the attention FLOPs 12·L·d·s² take 1/0.75 as long and nothing else does."""
    m = model_size("160m")
    s, mfu, peak = 32768, 0.4, 1e15
    even, uneven = (project.project(["160m"], [s], cells=1e6, gpus=8, mfu=mfu, peak_flops=peak,
                                    attentions=("sigmoid",), context_parallel=P)[0] for P in (4, 8))
    assert even["cp_head_balance"] == 1.0 and uneven["cp_head_balance"] == 0.75
    assert even["gpu_hours"] == pytest.approx(1e6 * flops_per_cell(m, s) / (mfu * peak) / 3600)
    attention = 12 * m.n_layers * m.d_model * s * s
    assert uneven["gpu_hours"] / even["gpu_hours"] == pytest.approx(
        (flops_per_cell(m, s) + attention / 3) / flops_per_cell(m, s))
    assert uneven["flops_per_cell"] == even["flops_per_cell"]     # the FLOPs counted (MFU) do not change
