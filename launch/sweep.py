"""Array sweeps: ``KEY=V1,V2 …`` arguments → the cartesian product of override lists, one per array task."""

from __future__ import annotations

import itertools


def parse_sweep(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["attention=sigmoid,softmax", "context=2048,4096"]`` → ``[("attention", [...]), ("context", [...])]``."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not values or any(not v for v in vals):
            raise ValueError(f"--array-sweep {spec!r}: expected KEY=V1,V2,... with non-empty values")
        if key in (k for k, _ in axes):
            raise ValueError(f"--array-sweep: key {key!r} given twice")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--array-sweep {spec!r}: repeated value")
        axes.append((key.strip(), vals))
    return axes


def expand(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product in argument order: one ``["key=value", …]`` per combination (``[[]]`` for no axes)."""
    return [[f"{k}={v}" for k, v in zip([k for k, _ in axes], combo)]
            for combo in itertools.product(*[vals for _, vals in axes])]


def tag(overrides: list[str]) -> str:
    """File-name-safe name of one combination: ``attention=softmax,context=4096`` → ``attention-softmax_context-4096``."""
    return "_".join(o.split("=", 1)[0].split(".")[-1] + "-" + o.split("=", 1)[1] for o in overrides).replace("/", "-") or "run"
