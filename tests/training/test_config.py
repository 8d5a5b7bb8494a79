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
    ("model.activation_checkpointing=-2", "activation_checkpointing must be true, false or k >= 1"),
    ("model.activation_checkpointing=some", r"model.activation_checkpointing: 'some' does not fit"),
    ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio must lie in \[0, 1\]"),
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


@pytest.mark.parametrize("text, value", [
    ("2e-3", 2e-3), ("1e4", 1e4), ("5_000", 5000), ("-.5", -0.5), ("1.5E+3", 1500.0), ("+3", 3), ("7", 7),
])
def test_numbers_as_people_write_them_fit_every_numeric_field(tmp_path, text, value):
    # YAML 1.1 reads 2e-3 and 1e4 as strings; float, int, optional and str|float fields must all take them.
    over = [f"optim.lr={text}", f"optim.grad_clip={text}", f"model.sigmoid_bias={text}", "run.mask_ratio=1e-1",
            f"optim.betas=[{text}, 0.99]"]
    cfg = load_config(None, over)
    for got in (cfg.optim.lr, cfg.optim.grad_clip, cfg.model.sigmoid_bias, cfg.optim.betas[0]):
        assert type(got) is float and got == value
    assert cfg.run.mask_ratio == 0.1
    if float(value).is_integer():   # int fields take integral numbers in any notation
        cfg = load_config(None, [f"run.max_steps={text}", f"optim.warmup_steps={text}"])
        assert type(cfg.run.max_steps) is int and cfg.run.max_steps == cfg.optim.warmup_steps == int(value)
    p = tmp_path / "c.yaml"  # the same in a config file
    p.write_text(f"optim:\n  lr: {text}\nrun:\n  max_steps: 1e4\n")
    cfg = load_config(p)
    assert cfg.optim.lr == value and cfg.run.max_steps == 10_000
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override, match", [
    ("run.max_steps=1.5", "run.max_steps: expected int"),
    ("run.max_steps=2e-3", "run.max_steps: expected int"),
    ("optim.lr=2e-3x", "optim.lr: expected float"),
    ("optim.lr=1..0", "optim.lr: expected float"),
    ("optim.lr=e4", "optim.lr: expected float"),
    ("run.zero_stage=true", "run.zero_stage: expected int"),
])
def test_non_numbers_are_still_refused(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_a_numeric_string_stays_a_string_in_a_str_field():
    cfg = load_config(None, ["run.dir=1e4", "model.sigmoid_bias=log_n"])
    assert cfg.run.dir == "1e4" and cfg.model.sigmoid_bias == "log_n"


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("1", 1), ("2", 2), ("4", 4)])
def test_activation_checkpointing_is_a_switch_or_every_kth_block(text, value):
    cfg = load_config(None, [f"model.activation_checkpointing={text}"])
    assert cfg.model.activation_checkpointing == value and type(cfg.model.activation_checkpointing) is type(value)
