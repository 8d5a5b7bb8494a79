import numpy as np
import pandas as pd
import pytest

from data_prep.vocab import DEFAULT_SYMBOL_TABLE, GeneVocab, normalize_ids, read_symbol_table
from h5ad_factory import ensembl


def test_normalize_strips_versions_only_on_ensembl():
    out = normalize_ids(["ENSG00000141510.17", "ENSMUSG00000059552.3", "ENSG00000141510", "TP53", "RP11.2"])
    assert out.tolist() == ["ENSG00000141510", "ENSMUSG00000059552", "ENSG00000141510", "TP53", "RP11.2"]


def test_roundtrip_and_hash(tmp_path, rng):
    n = int(rng.integers(5, 50))
    ids = [ensembl(i) for i in rng.choice(10**6, n, replace=False)]
    syms = [f"G{i}" if i % 3 else "" for i in range(n)]
    v = GeneVocab(ids, syms)
    sha = v.save(tmp_path / "vocab.tsv")
    w = GeneVocab.load(tmp_path / "vocab.tsv")
    assert w == v and len(w) == n and w.symbols.tolist() == syms and w.sha256() == v.sha256()
    assert len(sha) == 64


def test_map_var_ids_from_index_column_and_versions(rng):
    ids = [ensembl(i) for i in range(20)]
    v = GeneVocab(ids)
    perm = rng.permutation(20)[:12]
    by_index = pd.DataFrame(index=[ids[i] + ".4" for i in perm] + ["ENSG99999999999"])
    assert v.map_var(by_index).tolist() == perm.tolist() + [-1]
    by_col = pd.DataFrame({"gene_ids": [ids[i] for i in perm]}, index=[f"SYM{i}" for i in perm])
    out = v.map_var(by_col)
    assert out.dtype == np.int32 and out.tolist() == perm.tolist()


def test_duplicate_ids_map_to_same_vocab_id():
    v = GeneVocab([ensembl(0), ensembl(1)])
    var = pd.DataFrame({"gene_ids": [ensembl(1), ensembl(1) + ".2", ensembl(0)]}, index=["a", "b", "c"])
    assert v.map_var(var).tolist() == [1, 1, 0]


def test_symbols_via_vocab_and_table(tmp_path):
    v = GeneVocab([ensembl(0), ensembl(1), ensembl(2)], ["CD3E", "", "MS4A1"])
    table = tmp_path / "t.csv"
    pd.DataFrame({"gene_id": [ensembl(1) + ".3", ensembl(5), ensembl(6)],
                  "gene_name": ["NKG7", "AMBIG", "AMBIG"]}).to_csv(table, index=False)
    t = read_symbol_table(table)
    assert t == {"NKG7": ensembl(1)}  # the ambiguous symbol is left out
    var = pd.DataFrame(index=["MS4A1", "NKG7", "AMBIG", "CD3E"])
    assert v.map_var(var).tolist() == [2, -1, -1, 0]
    assert v.map_var(var, symbol_table=t).tolist() == [2, 1, -1, 0]


def test_from_vars_union_sorted_with_symbols():
    a = pd.DataFrame({"gene_ids": [ensembl(3), ensembl(1)]}, index=["C", "A"])
    b = pd.DataFrame(index=[ensembl(2) + ".1", ensembl(3)])
    v = GeneVocab.from_vars([a, b])
    assert v.gene_ids.tolist() == [ensembl(1), ensembl(2), ensembl(3)]
    assert v.symbols.tolist() == ["A", "", "C"]


def test_bad_vocab_files(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        GeneVocab([ensembl(1), ensembl(1) + ".2"])
    p = tmp_path / "v.tsv"
    p.write_text("id\tname\nX\tY\n")
    with pytest.raises(ValueError, match="gene_id"):
        GeneVocab.load(p)


@pytest.mark.parametrize("layout", ["header", "headerless", "headerless_swapped", "tsv_gz_headerless", "odd_names"])
def test_symbol_table_layouts(tmp_path, layout):
    rng = np.random.default_rng()
    n = int(rng.integers(5, 30))
    ids = [ensembl(int(i)) + (".7" if k % 3 == 0 else "") for k, i in enumerate(rng.choice(10_000, n, replace=False))]
    syms = [f"G{k}X" for k in range(n)]
    ids.append(ensembl(99_999))
    syms.append(syms[0])                      # the first symbol names two IDs: ambiguous, left out
    df = pd.DataFrame({"gene_id": ids, "gene_name": syms})
    path = tmp_path / "t.csv"
    if layout == "header":
        df.to_csv(path, index=False)
    elif layout == "headerless":
        df.to_csv(path, index=False, header=False)
    elif layout == "headerless_swapped":
        df[["gene_name", "gene_id"]].to_csv(path, index=False, header=False)
    elif layout == "tsv_gz_headerless":
        path = tmp_path / "t.tsv.gz"
        df.to_csv(path, index=False, header=False, sep="\t")
    else:
        df.rename(columns={"gene_id": "Ensembl_Gene_ID", "gene_name": "Symbol"}).to_csv(path, index=False)
    t = read_symbol_table(path)
    assert t == {s: i.split(".")[0] for s, i in zip(syms[1:-1], ids[1:-1])}


@pytest.mark.parametrize("text, match", [
    ("a,b\nx,y\n", "need an ID column and a symbol column"),
    (f"{ensembl(1)},A,extra\n{ensembl(2)},B,more\n", "no header and 3 columns"),
    ("gene_id,gene_name\nnot_an_id,A\nalso_not,B\n", "does not hold Ensembl gene IDs"),
    ("", "empty|cannot read"),
])
def test_bad_symbol_tables_are_named(tmp_path, text, match):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_symbol_table(p)


def test_default_symbol_table_is_the_recorded_gencode_v44_file():
    import gzip
    import hashlib

    readme = (DEFAULT_SYMBOL_TABLE.parent / "README.md").read_text()
    digest = hashlib.sha256(gzip.decompress(DEFAULT_SYMBOL_TABLE.read_bytes())).hexdigest()
    assert f"`{digest}`" in readme and "GENCODE release 44" in readme
    t = read_symbol_table(DEFAULT_SYMBOL_TABLE)
    assert 60_000 < len(t) < 62_754                 # 62,754 genes less the ambiguous symbols
    # well-known markers map to their Ensembl IDs; an ambiguous symbol (758 Y_RNA genes) does not
    assert t["CD3E"] == "ENSG00000198851" and t["MS4A1"] == "ENSG00000156738" and t["NKG7"] == "ENSG00000105374"
    assert "Y_RNA" not in t
