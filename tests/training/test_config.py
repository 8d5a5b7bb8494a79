"""training.config: YAML + presets + dotted overrides, and clear errors on bad input."""

import pytest
import yaml

from training.config import load_config
from training.deepspeed_config import deepspeed_config


def test_yaml_preset_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"preset": "160m", "attention": "softmax"}, "run": {"zero_stage": 1}}))
    cfg = load_config(p, ["run.zero_stage=3", "optim.grad_clip=null", "optim.betas=[0.9, 0.99]", "model.n_layers=3"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (768, 12, 3)   # preset + override
    assert cfg.model.attention == "softmax" and cfg.run.zero_stage == 3
    assert cfg.optim.grad_clip is None and cfg.optim.betas == (0.9, 0.99)
    ds = deepspeed_config(cfg, world_size=2, cuda=False)
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == cfg.data.batch_size * 2 and ds["bf16"]["enabled"] is False
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override, match", [
    ("run.zero_stag=1", r"unknown key\(s\) in run"),
    ("run.zero_stage=two", "run.zero_stage: expected int"),
    ("model.attention=relu", "model.attention must be"),
    ("model.preset=huge", "unknown model preset"),
    ("training.x=1", "must be <section>.<field>"),
    ("run.max_steps", "must look like section.key=value"),
    ("run.nan_policy=ignore", "nan_policy"),
])
def test_bad_overrides_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_shipped_configs_load():
    from pathlib import Path
    for p in sorted(Path(__file__).parents[2].joinpath("training", "configs").glob("*.yaml")):
        cfg = load_config(p)
        assert cfg.model.preset in p.name or cfg.model.preset == "tiny"
