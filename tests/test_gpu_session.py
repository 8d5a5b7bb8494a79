"""benchmarks/gpu_session.sh on a CPU box: its clock sampling (benchmarks/gpu_clocks.py, a stand-in nvidia-smi) and
its train phase's variants (a stand-in benchmarks/training_gpu.py)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_clocks  # noqa: E402


def _stamp(t: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def test_summary_of_busy_samples_per_gpu(tmp_path):
    t0 = 1_800_000_000.0
    rows = []
    for i in range(20):   # gpu 0: busy at 1400-1590 MHz, power cap in every other sample; gpu 1 idle
        rows.append(f"{_stamp(t0 + i)}, 0, 97, {1400 + 10 * i}, 1980, 690.5, 700.00, {60 + i}, "
                    f"{'0x0000000000000004' if i % 2 else '0x0000000000000000'}")
        rows.append(f"{_stamp(t0 + i)}, 1, 0, 345, 1980, 75.0, 700.00, 30, 0x0000000000000001")
    rows += ["garbage", f"{_stamp(t0 + 3)}, 0, [N/A], [N/A], 1980, [N/A], 700.00, 61"]   # skipped / not busy
    csv = tmp_path / "c.csv"
    csv.write_text("\n".join(rows) + "\n")
    samples = gpu_clocks.read_samples(csv)
    assert len(samples) == 41 and abs(samples[0]["t"] - t0) < 1e-6
    (s,) = gpu_clocks.summarize(samples, t0 + 5, t0 + 14)            # 10 busy samples of gpu 0; gpu 1 never busy
    assert s["gpu"] == 0 and s["busy_samples"] == 10
    assert s["sm_mhz_median"] == 1495 and s["sm_mhz_p10"] == 1450 and s["sm_mhz_max"] == 1980
    assert s["sm_of_max"] == round(1495 / 1980, 3) and s["power_limit_w"] == 700 and s["temperature_c_max"] == 74
    assert s["reasons"] == {"power cap": 0.5}
    assert "SM 1495 MHz median" in gpu_clocks.line("train", s) and "power cap 50%" in gpu_clocks.line("train", s)
    assert gpu_clocks.summarize(samples, t0 + 100, t0 + 200) == []


FAKE_SMI = """#!/bin/bash
case " $* " in
  *" -L "*) echo "GPU 0: Stand-in H200 (UUID: GPU-0)" ;;
  *"-lms"*) while true; do echo "$(date +'%Y/%m/%d %H:%M:%S.%3N'), 0, 100, 1500, 1980, 650.00, 700.00, 71, 0x0000000000000004"
            sleep 0.1; done ;;
  *) echo "$(date +'%Y/%m/%d %H:%M:%S.%3N'), 0, 0, 345, 1980, 80.00, 700.00, 30, 0x0000000000000001" ;;
esac
"""


def _session(tmp_path):
    """A copy of gpu_session.sh with what it needs, a stand-in nvidia-smi and the venv's python3 on PATH."""
    work = tmp_path / "repo"
    (work / "benchmarks").mkdir(parents=True)
    (work / "sigattn").mkdir()
    (work / "sigattn" / "_C.stand-in.so").write_text("")                  # skip the extension build
    for f in ("gpu_session.sh", "gpu_clocks.py"):
        shutil.copy(REPO / "benchmarks" / f, work / "benchmarks" / f)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text(FAKE_SMI)
    (bin_ / "nvidia-smi").chmod(0o755)
    (bin_ / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # the venv's (a link would lose it)
    (bin_ / "python3").chmod(0o755)
    out = tmp_path / "out"
    return work, bin_, out, dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", OUT=str(out))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_session_samples_clocks_per_phase_and_stops_the_sampler(tmp_path):
    work, bin_, out, env = _session(tmp_path)
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh", "gluon-api"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert "== phase gluon-api" in r.stdout, r.stdout + r.stderr
    assert "clocks gluon-api gpu0: SM 1500 MHz median (0.76 of 1980)" in r.stdout, r.stdout
    (row,) = [json.loads(x) for x in (out / "clocks.jsonl").read_text().splitlines()]
    assert row["phase"] == "gluon-api" and row["reasons"] == {"power cap": 1.0} and row["busy_samples"] >= 1
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(bin_ / "nvidia-smi")], capture_output=True, text=True).stdout
    assert not left.strip(), f"sampler still running: {left}"

    r = subprocess.run(["bash", "benchmarks/gpu_session.sh", "gluon-api"], cwd=work, env=dict(env, CLOCKS="0"),
                       capture_output=True, text=True, timeout=120)
    assert "== phase gluon-api" in r.stdout and "clocks gluon-api" not in r.stdout


STUB_TRAIN = """import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
json.dump(sys.argv[1:], open(out, "w"))
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_train_variants_run_the_phase_once_each_with_their_overrides(tmp_path):
    work, _, out, env = _session(tmp_path)
    (work / "benchmarks" / "training_gpu.py").write_text(STUB_TRAIN)
    env.update(CLOCKS="0", TRAIN_RUNS="160m:8192", TRAIN_OVERRIDES="run.log_every=5",
               TRAIN_VARIANTS="noprefetch=run.prefetch=false default= both=optim.device_skip=true,run.prefetch=true")
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh", "train"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert "== phase train" in r.stdout, r.stdout + r.stderr
    overrides = {}
    for name in ("noprefetch", "default", "both"):
        argv = json.loads((out / f"training_{name}.json").read_text())
        overrides[name] = [argv[i + 1] for i, a in enumerate(argv) if a == "--override"]
        assert argv[argv.index("--runs") + 1] == "160m:8192"
    assert overrides == {"noprefetch": ["run.log_every=5", "run.prefetch=false"], "default": ["run.log_every=5"],
                         "both": ["run.log_every=5", "optim.device_skip=true", "run.prefetch=true"]}
    # without variants: TRAIN_OVERRIDES as given (commas untouched), into TRAIN_OUT
    env.pop("TRAIN_VARIANTS")
    env.update(TRAIN_OVERRIDES="optim.betas=(0.9,0.95)", TRAIN_OUT="one.json")
    subprocess.run(["bash", "benchmarks/gpu_session.sh", "train"], cwd=work, env=env, capture_output=True, timeout=120)
    argv = json.loads((out / "one.json").read_text())
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--override"] == ["optim.betas=(0.9,0.95)"]
