"""Plot a ``benchmarks/attention.py`` JSON: TFLOP/s (on real tokens) vs N per kernel, forward and backward panels.

    python benchmarks/plot_attention.py benchmarks/results/attention_h100_d128.json --out docs/attention_h100_d128.png
"""

import argparse
import json
from pathlib import Path

STYLE = {"hopper_padded": ("sigattn Hopper (Gluon) padded", "tab:red", "-"),
         "hopper_varlen": ("sigattn Hopper (Gluon) varlen", "tab:pink", "-"),
         "ours_padded": ("sigattn portable padded", "tab:blue", "-"), "ours_varlen": ("sigattn portable varlen", "tab:cyan", "-"),
         "tsig": ("triton-sigmoid", "tab:orange", "--"), "sdpa_flash": ("SDPA flash (softmax)", "tab:gray", ":"),
         "sdpa_cudnn": ("SDPA cuDNN (softmax)", "black", ":"), "flex": ("FlexAttention (softmax)", "tab:green", ":")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(a.json.read_text())
    rows = [r for r in res["rows"] if "tflops" in r]
    pads = sorted({r["pad"] for r in rows})
    fig, axes = plt.subplots(len(a.modes), len(pads), figsize=(4.3 * len(pads), 3.5 * len(a.modes) + 0.5),
                             squeeze=False, sharey="row")
    for i, mode in enumerate(a.modes):
        for j, pad in enumerate(pads):
            ax = axes[i][j]
            for kern, (label, color, ls) in STYLE.items():
                pts = sorted((r["N"], r["tflops"]) for r in rows
                             if r["kernel"] == kern and r["mode"] == mode and r["pad"] == pad)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, ls=ls, label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{'forward' if mode == 'fwd' else 'backward'}, {pad:g}% padding", fontsize=10)
            ax.set_xlabel("N (max sequence length)")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("TFLOP/s on real tokens")
    axes[0][0].legend(fontsize=8)
    D = rows[0]["D"] if rows else "?"
    fig.suptitle(f"{res['device']}, bf16, D={D}, 16,384 tokens/step, hidden 2048 — {res['date'][:10]}", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(a.out)


if __name__ == "__main__":
    main()
