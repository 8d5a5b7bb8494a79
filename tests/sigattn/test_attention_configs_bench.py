"""benchmarks/attention_configs.py (a GPU sweep): refuses a CPU-only machine and a malformed tile clearly."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import attention_configs  # noqa: E402


def test_tile_parsing_and_refusals(tmp_path):
    cfg = attention_configs.parse_tile("32,256,8,3")
    assert cfg.kwargs == {"BLOCK_M": 32, "BLOCK_N": 256} and (cfg.num_warps, cfg.num_stages) == (8, 3)
    with pytest.raises(SystemExit, match="'32,256' is not BM,BN,WARPS,STAGES"):
        attention_configs.parse_tile("32,256")
    if not attention_configs.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            attention_configs.main(["--out", str(tmp_path / "c.json")])
        assert not (tmp_path / "c.json").exists()
