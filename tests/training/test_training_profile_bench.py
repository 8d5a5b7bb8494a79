"""benchmarks/training_profile.py on the CPU: real trainer steps under torch.profiler, the time put into categories
that (with idle) add up to the step, a table and a plot; the categoriser on GPU kernel names."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import training_profile  # noqa: E402


@pytest.mark.parametrize("name, cat", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("hopper_fwd_kernel", "attention"), ("attn_bwd_kv_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("multi_tensor_apply_kernel<...AdamFunctor...>", "optimizer"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"), ("nvjet_hsh_256x128_64x4", "gemm"),
    ("aten::addmm", "gemm"), ("void at::native::(anonymous)::cunn_SoftMaxForward<4, float>", "other"),
    ("at::native::(anonymous)::nll_loss_forward_reduce_cuda_kernel_2d", "loss"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"), ("triton_per_fused_native_layer_norm_0", "other"),
    # a lambda in a kernel's name is not the LAMB optimizer (the H200 profile of df55f4b put GeLU's backward there)
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluBackwardCUDAKernelImpl(at::TensorIteratorBase&, "
     "at::native::GeluType)::{lambda()#2}::operator()", "other"), ("lamb_update_kernel", "optimizer")])
def test_categories(name, cat):
    assert training_profile.category(name) == cat


@pytest.mark.slow
def test_profile_of_a_tiny_run(tmp_path):
    out = tmp_path / "prof"
    assert training_profile.main(["--runs", "tiny:64", "--attention", "sigmoid", "--warmup", "2", "--steps", "2",
                                  "--batch-size", "4", "--copies", "--out", str(out)]) == 0
    res = json.loads((out / "profile.json").read_text())
    assert res["device"] == "cpu" and res["commit"] and res["steps"] == 2
    (row,) = res["rows"]
    assert "error" not in row, row
    assert row["step_ms"] > 0 and set(row["categories"]) == set(training_profile.ORDER)
    shares = sum(c["share"] for c in row["categories"].values())
    assert shares == pytest.approx(1.0, abs=0.15)               # categories + idle ≈ the step (busy ≤ wall)
    assert row["categories"]["gemm"]["ms_per_step"] > 0 and row["categories"]["attention"]["ms_per_step"] > 0
    assert row["categories"]["optimizer"]["ms_per_step"] > 0   # the Adam step's ops, attributed by their parent
    assert row["top"] and row["tokens_per_s"] > 0
    src = row["copy_sources"]                                  # --copies: copies ranked by their Python source
    assert src and all(c["ms_per_step"] > 0 and c["calls_per_step"] > 0 for c in src)
    assert src == sorted(src, key=lambda c: -c["ms_per_step"])
    assert any(".py(" in f for c in src for f in c["stack"])   # frames of our code ("file.py(line): function")
    assert "| tiny | 64 | sigmoid | 4 |" in (out / "profile.md").read_text()
    phases = row["host_by_phase"]                              # the trainer's scopes, with the ops under them
    assert {"data", "mask_copy", "forward", "backward", "update"} <= set(phases)
    assert phases["forward"]["ms_per_step"] > 0 and phases["forward"]["top"]
    assert "Host time by trainer phase" in (out / "profile.md").read_text()
    assert (out / "profile.png").stat().st_size > 5000


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        training_profile.main(["--runs", "tiny", "--out", str(tmp_path / "p")])
    assert "expected PRESET:CONTEXT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training_profile.main(["--runs", "tiny:64", "--steps", "0", "--out", str(tmp_path / "p")])


def test_alone_time_is_what_no_other_category_overlaps():
    # copies 0–10 under attention 2–8, gemm 12–14 alone; a second attention kernel 9–11 overlapping nothing but
    # the gemm-free gap: copies alone 0–2 and 8–9 (3), attention alone 10–11 (1), gemm alone 12–14 (2)
    got = training_profile.alone_us([(0, 10, "copies"), (2, 8, "attention"), (9, 11, "attention"),
                                     (12, 14, "gemm")])
    assert got == {"copies": 3, "attention": 1, "gemm": 2}


class _Ev:
    def __init__(self, name, start, end, cuda=False, children=()):
        self.name, self.device_type = name, "DeviceType.CUDA" if cuda else "DeviceType.CPU"
        self.time_range = type("R", (), {"start": start, "end": end})()
        self.cpu_children = list(children)


def test_gpu_idle_is_put_on_the_host_phase_it_waits_on():
    # one step 0–100 µs; kernels 10–40 and 35–55 (overlapping) and 70–90; host: data 0–12, forward 12–50,
    # update 50–95 → idle 0–10 (data), 55–70 (update), 90–100 (update 90–95, outside 95–100); scopes and the
    # step itself are not kernels, and a second step doubles nothing but the denominator
    ev = [_Ev("ProfilerStep#3", 0, 100), _Ev("k1", 10, 40, cuda=True), _Ev("k2", 35, 55, cuda=True),
          _Ev("k3", 70, 90, cuda=True), _Ev("trainer/data", 0, 12), _Ev("trainer/forward", 12, 50),
          _Ev("trainer/update", 50, 95), _Ev("aten::mm", 20, 30),
          # on a GPU the step and each scope also show on the device timeline, as annotations over their kernels
          # (the first H200 run counted them as busy: 1.5 ms of idle per step where 577 were)
          _Ev("ProfilerStep#3", 0, 100, cuda=True), _Ev("trainer/update", 50, 95, cuda=True)]
    got = training_profile.idle_by_phase(ev, 1)
    assert got == pytest.approx({"data": 10e-3, "update": 20e-3, "outside": 5e-3})
    assert list(got) == ["update", "data", "outside"]                      # largest first
    assert training_profile.idle_by_phase(ev, 2)["update"] == pytest.approx(10e-3)
    table = training_profile._table([{"size": "160m", "context": 8192, "attention": "sigmoid", "batch_size": 8,
                                      "step_ms": 0.1, "categories": {c: {"share": 0.1} for c in training_profile.ORDER},
                                      "idle_by_phase_ms": got}])
    assert "| update | data | outside |" in table and "| 160m | 8192 | sigmoid | 0.0 | 0.0 | 0.0 |" in table


def test_gpu_breakdown_counts_the_host_step_once_and_annotations_as_nothing():
    # host step 0–100 µs; on the device its annotation 10–90 and a phase scope's 10–40 (not work), kernels 10–40
    # (GEMM) and 70–90 (attention): busy 50, idle 50 of one 100 µs step. The first H200 profiles summed the step's
    # host range and its device annotation (a step ~2× too long) and counted annotations as busy.
    ev = [_Ev("ProfilerStep#3", 0, 100), _Ev("ProfilerStep#3", 10, 90, cuda=True),
          _Ev("trainer/forward", 10, 40, cuda=True), _Ev("nvjet_sm90_tst_192x192", 10, 40, cuda=True),
          _Ev("hopper_fwd_kernel", 70, 90, cuda=True)]
    got = training_profile.breakdown(ev, 1, on_gpu=True)
    assert got["step_ms"] == pytest.approx(0.1) and got["busy_ms"] == pytest.approx(0.05)
    assert got["categories"]["idle"]["share"] == pytest.approx(0.5)
    assert got["categories"]["gemm"]["ms_per_step"] == pytest.approx(0.03)
    assert got["categories"]["attention"]["ms_per_step"] == pytest.approx(0.02)
    assert got["idle_by_phase_ms"] == pytest.approx({"outside": 0.05})


def test_host_time_by_phase_names_the_ops_under_it():
    # two steps; mask_copy 0–30 and 100–120 µs with its children (pin_memory 5–25 and 100–110, aten::to 25–30);
    # CUDA runtime calls nested under them (a page-locked allocation, a copy inside aten::copy_, a sync)
    alloc = _Ev("cudaHostAlloc", 6, 20)
    copy = _Ev("aten::copy_", 25, 30, children=[_Ev("cudaMemcpyAsync", 26, 27), _Ev("cudaStreamSynchronize", 27, 29)])
    ev = [_Ev("trainer/mask_copy", 0, 30, children=[_Ev("aten::pin_memory", 5, 25, children=[alloc]),
                                                     _Ev("aten::to", 25, 30, children=[copy])]),
          _Ev("trainer/mask_copy", 100, 120, children=[_Ev("aten::pin_memory", 100, 110)]),
          _Ev("trainer/mask_copy", 0, 30, cuda=True), _Ev("trainer/forward", 30, 90)]
    got = training_profile.host_by_phase(ev, 2)
    assert list(got) == ["forward", "mask_copy"]                              # largest first
    assert got["mask_copy"]["ms_per_step"] == pytest.approx(25e-3)             # (30 + 20) / 2 µs, the device copy not
    assert got["mask_copy"]["top"] == [{"name": "aten::pin_memory", "ms_per_step": pytest.approx(15e-3)},
                                       {"name": "aten::to", "ms_per_step": pytest.approx(2.5e-3)}]
    assert got["mask_copy"]["cuda"] == [{"name": "cudaHostAlloc", "ms_per_step": pytest.approx(7e-3)},
                                        {"name": "cudaStreamSynchronize", "ms_per_step": pytest.approx(1e-3)},
                                        {"name": "cudaMemcpyAsync", "ms_per_step": pytest.approx(0.5e-3)}]
    assert got["forward"] == {"ms_per_step": pytest.approx(30e-3), "top": [], "cuda": []}
    row = {"size": "160m", "context": 8192, "attention": "sigmoid", "batch_size": 8, "step_ms": 1.0,
           "categories": {c: {"share": 0.1} for c in training_profile.ORDER}, "host_by_phase": got}
    assert "mask_copy 0.0 (aten::pin_memory 0.0, aten::to 0.0) [CUDA calls: cudaHostAlloc 0.0," in \
        training_profile._table([row])


def test_attention_kernel_rates_count_passes_and_the_backward_convention():
    # 2 steps × 2 layers × 1 micro-batch: forward 4 launches of 10 µs (one pass), backward 8 of 20 µs,
    # a recomputing run launches its forward twice as often; a GEMM is not attention
    fwd = [_Ev("hopper_fwd_kernel", 100 * i, 100 * i + 10, cuda=True) for i in range(4)]
    bwd = [_Ev("attn_bwd_kv_kernel", 1000 + 100 * i, 1000 + 100 * i + 20, cuda=True) for i in range(4)]
    ev = fwd + bwd + [_Ev("nvjet_sm90_tst_192x192", 0, 50, cuda=True), _Ev("hopper_fwd_kernel", 0, 10)]  # host: no
    got = training_profile.attention_kernels(ev, 2, fwd_flops=1e9, calls_per_pass=2)
    assert got["forward"]["ms_per_step"] == pytest.approx(0.02) and got["forward"]["passes"] == 1
    assert got["forward"]["tflops"] == pytest.approx(1e9 / 20e-6 / 1e12)            # 50 TFLOP/s
    assert got["backward"]["tflops"] == pytest.approx(2.5e9 / 40e-6 / 1e12)
    assert got["backward"]["kernels"] == ["attn_bwd_kv_kernel"]
    twice = training_profile.attention_kernels(ev + fwd, 2, fwd_flops=1e9, calls_per_pass=2)["forward"]
    assert twice["passes"] == 2 and twice["tflops"] == pytest.approx(2e9 / 40e-6 / 1e12)
    row = {"size": "160m", "context": 8192, "attention": "sigmoid", "batch_size": 8, "step_ms": 1.0,
           "categories": {c: {"share": 0.1} for c in training_profile.ORDER}, "attention_kernels": {"forward": twice}}
    assert "| 160m | 8192 | sigmoid | 0.0 | 50 (2 passes) | – | – |" in training_profile._table([row])
