"""Resolve a training CONFIG (preset name or YAML path) and check ``dotted.key=value`` overrides before submitting.

A preset ``NAME`` is ``training/configs/NAME.yaml``. When the trainer entry module offers
``load_config(config, overrides)`` that is the authority (it knows defaults and types); otherwise each
override key must name an existing key of the YAML, and values are parsed as YAML scalars.
Short sweep keys resolve to the unique leaf with that name (``attention`` → ``model.attention``;
``context`` also matches a leaf ``context_length``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "training" / "configs"
LEAF_ALIASES = {"context": ("context", "context_length")}


class ConfigError(ValueError):
    """A config or override that would make the job fail; raised before anything is submitted."""


def presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in preset_dir.glob("*.yaml")) if preset_dir.is_dir() else []


def resolve_config(config: str, preset_dir: Path = PRESET_DIR) -> Path:
    """Absolute path of a YAML config given as a path or a preset name."""
    p = Path(config)
    if p.suffix in (".yaml", ".yml") or "/" in config:
        if not p.is_file():
            raise ConfigError(f"config file not found: {config}")
        return p.resolve()
    candidate = preset_dir / f"{config}.yaml"
    if candidate.is_file():
        return candidate.resolve()
    raise ConfigError(f"unknown preset {config!r}; presets in {preset_dir}: {', '.join(presets(preset_dir)) or 'none'}")


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]


def resolve_key(cfg: dict, key: str) -> str:
    """Full dotted key for ``key`` (itself if it exists, else the unique leaf ending in that name)."""
    leaves = _leaves(cfg)
    if key in leaves:
        return key
    names = LEAF_ALIASES.get(key, (key,))
    matches = [leaf for leaf in leaves if leaf.rsplit(".", 1)[-1] in names]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"config key {key!r} is ambiguous: {', '.join(matches)}")
    raise ConfigError(f"unknown config key {key!r}")


def _tree(config_path: Path, loader) -> dict:
    """The config as nested dict: the trainer's resolved config (defaults included) when it has a loader."""
    if loader is not None:
        try:
            cfg = loader(str(config_path), [])
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"config {config_path}: {e}") from None
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    try:
        cfg = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {config_path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {config_path} is not a mapping")
    return cfg


def check_overrides(config_path: Path, overrides: list[str], entry_module: str | None = None) -> list[str]:
    """Overrides with full dotted keys, or ``ConfigError`` naming the bad one."""
    for o in overrides:
        key, sep, _ = o.partition("=")
        if not sep or not key or key != key.strip() or " " in key:
            raise ConfigError(f"bad override {o!r}: expected dotted.key=value")
    loader = getattr(importlib.import_module(entry_module), "load_config", None) if entry_module else None
    cfg = _tree(config_path, loader)
    full = []
    for o in overrides:
        key, _, value = o.partition("=")
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"bad override {o!r}: value is not valid YAML ({e})") from None
        full.append(f"{resolve_key(cfg, key)}={value}")
    if loader is not None:
        try:
            loader(str(config_path), full)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"config {config_path.name} with overrides {full}: {e}") from None
    return full
