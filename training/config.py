"""Run configuration: dataclasses, YAML files and dotted command-line overrides.

A config file is nested YAML with sections ``model``, ``data``, ``optim``, ``run``, ``parallel``. The model
section may name a ``preset`` (see :mod:`training.presets`); the preset fills every
architecture field the file does not set. Overrides ``a.b=value`` are parsed with YAML
(``run.zero_stage=2``, ``optim.grad_clip=null``) and applied before the dataclasses are built, so
unknown keys or ill-typed values fail with a message naming the key. Numeric fields take the numbers
people write (``optim.lr=2e-3``, ``run.max_steps=1e4``, ``5_000``), in files and overrides alike.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from training.presets import preset


@dataclass
class ModelConfig:
    preset: str | None = "tiny"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    attention: str = "sigmoid"          # sigmoid | softmax
    sigmoid_bias: str | float | None = "log_n"   # b = −log(n_valid) per sequence by default
    embedding: str = "cls"              # cls | mean  (cell embedding)
    norm_eps: float = 1e-5
    # false: none; true (= 1): every block recomputes its forward in backward (full); k ≥ 2: every k-th block
    # (selective, layer level: ~1/k of the recompute for a memory in between; launch.memory.plan weighs them)
    activation_checkpointing: bool | int = False
    # Filled from the tokenizer when the model is built (kept in the saved config).
    n_tokens: int | None = None
    n_bins: int | None = None

    def __post_init__(self):
        if self.attention not in ("sigmoid", "softmax"):
            raise ValueError(f"model.attention must be 'sigmoid' or 'softmax', got {self.attention!r}")
        ac = self.activation_checkpointing
        if not isinstance(ac, (bool, int)) or ac < 0:
            raise ValueError("model.activation_checkpointing must be true, false or k >= 1 (checkpoint every k-th "
                             f"block), got {ac!r}")
        if self.embedding not in ("cls", "mean"):
            raise ValueError(f"model.embedding must be 'cls' or 'mean', got {self.embedding!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")


@dataclass
class DataConfig:
    mds: str | None = None              # data_prep output dir; None → synthetic cells
    split: str = "train"
    context_length: int = 2048
    n_bins: int = 51
    gene_selection: str = "sample"
    batch_size: int = 8                 # cells per micro-batch per rank
    num_workers: int = 0
    shuffle: bool = True
    synthetic_vocab: int = 20_000       # synthetic cells only
    synthetic_mean_genes: int = 1500    # synthetic cells only: mean expressed genes per cell


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1           # cosine decays to lr·min_lr_ratio at max_steps
    grad_clip: float | None = 1.0       # None or 0 → no clipping
    grad_accum: int = 1
    device_skip: bool = False           # bf16 ZeRO-1/2: clip and skip non-finite updates on the GPU (training.guarded_adamw)

    def __post_init__(self):
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1] (1 = constant after the warm-up), "
                             f"got {self.min_lr_ratio}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    mask_ratio: float = 0.15
    zero_stage: int = 1
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ckpt_every: int = 50                # ≤ 0: no periodic/final saves (benchmarks); request_stop still saves
    keep_last: int = 3
    log_every: int = 1
    nan_policy: str = "stop"            # stop | skip
    log_cell_ids: bool = False          # write cells.jsonl (cell ids per step) for audits
    tensorboard: bool = True
    progress: bool = True
    compile: bool = False               # regional torch.compile of each encoder block (training/compile.py)
    prefetch: bool = True               # mask and copy the next micro-batch while the GPU runs this backward

    def __post_init__(self):
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"run.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"run.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"run.zero_stage must be 0–3, got {self.zero_stage}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"run.mask_ratio must lie in (0, 1), got {self.mask_ratio}")


EXCHANGES = ("auto", "deepspeed", "ours")


def check_heads(n_heads: int, P: int, chunks: int = 1, exchange: str = "auto") -> None:
    """ValueError naming the problem unless each of the ``chunks`` head chunks gives every one of P ranks a head."""
    if n_heads % chunks:
        raise ValueError(f"parallel.context_parallel_chunks={chunks} does not divide model.n_heads={n_heads}")
    if n_heads // chunks < P:
        where = f"model.n_heads={n_heads}" + (f" / parallel.context_parallel_chunks={chunks}" if chunks > 1 else "")
        raise ValueError(f"parallel.context_parallel_degree={P} exceeds {where} = {n_heads // chunks} heads: the "
                         "Ulysses all-to-all gives every context-parallel rank at least one whole head")
    if exchange == "deepspeed" and chunks > 1:
        raise ValueError(f"parallel.context_parallel_exchange=deepspeed cannot pipeline head chunks "
                         f"(parallel.context_parallel_chunks={chunks}): use 'ours' or 'auto'")
    if exchange == "deepspeed" and n_heads % P:
        raise ValueError(f"parallel.context_parallel_exchange=deepspeed needs parallel.context_parallel_degree={P} "
                         f"to divide model.n_heads={n_heads} (DeepSpeed splits heads evenly): use 'ours' or 'auto'")


@dataclass
class ParallelConfig:
    # P ranks share each cell's sequence (Ulysses all-to-all over heads; docs/context_parallel.md):
    # world = data-parallel × P; P must divide the world size and be ≤ model.n_heads (P ∤ n_heads: uneven heads).
    context_parallel_degree: int = 1
    # C > 1: the heads go through the exchange in C chunks whose all-to-alls overlap the other chunks' attention
    # (training.parallel.ulysses_pipelined); C must divide model.n_heads, P ≤ n_heads/C. 1: one exchange.
    context_parallel_chunks: int = 1
    # which all-to-all: "auto" = DeepSpeed's where it applies (P | n_heads, one chunk), else ours; "deepspeed" or
    # "ours" force one (A/B timing: docs/context_parallel.md); "deepspeed" refuses chunks > 1 and P ∤ n_heads
    context_parallel_exchange: str = "auto"

    def __post_init__(self):
        if self.context_parallel_degree < 1:
            raise ValueError(f"parallel.context_parallel_degree must be >= 1, got {self.context_parallel_degree}")
        if self.context_parallel_chunks < 1:
            raise ValueError(f"parallel.context_parallel_chunks must be >= 1, got {self.context_parallel_chunks}")
        if self.context_parallel_chunks > 1 and self.context_parallel_degree == 1:
            raise ValueError(f"parallel.context_parallel_chunks={self.context_parallel_chunks} needs "
                             "parallel.context_parallel_degree > 1 (it pipelines the context-parallel exchange)")
        if self.context_parallel_exchange not in EXCHANGES:
            raise ValueError(f"parallel.context_parallel_exchange must be one of {', '.join(EXCHANGES)}, "
                             f"got {self.context_parallel_exchange!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        check_heads(self.model.n_heads, self.parallel.context_parallel_degree, self.parallel.context_parallel_chunks,
                    self.parallel.context_parallel_exchange)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        d = self.to_dict()
        d["optim"]["betas"] = list(d["optim"]["betas"])
        Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig,
            "parallel": ParallelConfig}


#: A number as people write it: ``2e-3``, ``1e4``, ``5_000``, ``-.5``, ``1.5E+3`` (YAML 1.1, which PyYAML
#: implements, reads exponents without a dot, such as ``2e-3``, as strings).
_NUMBER_RE = re.compile(r"[+-]?(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d+)?")


def _number(value) -> int | float | None:
    """``value`` as an int (integer literals) or float (any other number literal), else None."""
    if not isinstance(value, str) or not _NUMBER_RE.fullmatch(text := value.strip()):
        return None
    return int(text) if text.lstrip("+-").replace("_", "").isdigit() else float(text)


def _coerce(value, tp, key: str):
    """Check/convert a YAML value against a dataclass field type.

    Numeric fields also take numbers written as strings (``2e-3``, ``1e4``, ``5_000``); an int field takes
    a float with an integral value (``1e4`` → 10000) and refuses any other.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if _number(value) is not None:  # a numeric string fits a numeric member before a str one
            args = sorted(args, key=lambda a: a not in (int, float))
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, typing.get_args(tp), strict=True))
    if tp in (int, float) and (num := _number(value)) is not None:
        value = num
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")


def _build(cls, raw: dict, section: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"unknown key(s) in {section}: {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()})


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``a.b=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ValueError(f"override key {key!r} must be <section>.<field> with section in {list(SECTIONS)}")
    raw.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(text)


def from_dict(raw: dict) -> Config:
    """Build a Config from a nested dict, filling architecture fields from ``model.preset``."""
    raw = {k: dict(v or {}) for k, v in raw.items()}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid: {list(SECTIONS)}")
    model = raw.get("model", {})
    name = model.get("preset", ModelConfig.preset)
    if name is not None:
        model = {**preset(name), **model}
    raw["model"] = model
    return Config(**{s: _build(cls, raw.get(s, {}), s) for s, cls in SECTIONS.items()})


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults) and apply dotted overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)
