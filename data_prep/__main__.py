"""CLI: ``python -m data_prep build IN.h5ad [...] --out DIR [options]`` (see ``docs/data_prep.md``)."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # first, before the heavy imports: may re-run this command with glibc malloc settings
    from data_prep.malloc_env import reexec_with_malloc_env

    reexec_with_malloc_env(["-m", "data_prep", *sys.argv[1:]])

import argparse  # noqa: E402

from data_prep.build import BuildOptions, build  # noqa: E402
from data_prep.source import SourceError  # noqa: E402
from data_prep.split import SPLIT_BY  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = BuildOptions()
    ap = argparse.ArgumentParser(prog="python -m data_prep")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="h5ad files → Zarr v3 corpus + MDS shards")
    b.add_argument("inputs", nargs="+", metavar="IN.h5ad")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--vocab", help="use this vocab.tsv instead of building one from the inputs")
    b.add_argument("--symbol-table", help="CSV/TSV symbol→Ensembl ID table (header optional) for files without "
                   "gene IDs (default: the shipped GENCODE v44 human table)")
    b.add_argument("--min-genes", type=int, default=d.min_genes, help="drop cells with fewer expressed genes")
    b.add_argument("--min-match", type=float, default=d.min_match, help="refuse a dataset mapping fewer genes")
    b.add_argument("--split-by", choices=SPLIT_BY, default=d.split_by)
    b.add_argument("--val-frac", type=float, default=d.val_frac)
    b.add_argument("--test-frac", type=float, default=d.test_frac)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--workers", type=int, default=d.workers, help="parallel MDS writer processes")
    b.add_argument("--cell-type-key", default=d.cell_type_key)
    b.add_argument("--donor-key", default=d.donor_key)
    b.add_argument("--chunk-cells", type=int, default=d.chunk_cells, help="rows read per chunk (memory bound)")
    b.add_argument("--cells-per-part", type=int, default=d.cells_per_part, help="cells per MDS writer task")
    b.add_argument("--compression", default=d.compression,
                   help="MDS shard compression (streaming's names: zstd[:level], br, gz, snappy, bz2)")
    b.add_argument("--shard-mb", type=int, default=d.shard_mb, help="raw MDS shard size limit (MiB)")
    b.add_argument("--force", action="store_true", help="rebuild even if the manifest is up to date")
    a = ap.parse_args(argv)
    opts = BuildOptions(**{k: v for k, v in vars(a).items() if k not in ("cmd", "inputs", "out")})
    try:
        m = build(a.inputs, a.out, opts)
    except (SourceError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not m.get("skipped"):
        t = m["totals"]
        print(f"cells in {t['cells_in']}, out {t['cells_out']} (in MDS {t['cells_in_mds']}); "
              f"genes matched " + ", ".join(f"{r['name']} {r['n_genes_mapped']}/{r['n_genes']} "
                                            f"({r['count_share_mapped']:.1%} of counts)" for r in m["datasets"])
              + f"; vocab {m['vocab']['size']}; split {m['split']['effective']} {m['split']['n_cells']}; "
              f"shards {m['mds']['shards']}; {m['seconds']:.1f} s → {a.out}")
        for w in m.get("warnings", []):
            print(f"WARNING: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
