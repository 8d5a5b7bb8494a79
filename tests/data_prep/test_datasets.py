import anndata as ad
import pytest

from data_prep import datasets


def test_shipped_files_are_found_without_importing_pyroma():
    import sys
    p = datasets.pbmc3k_path()
    assert "pyroma" not in sys.modules
    a = ad.read_h5ad(p, backed="r")
    assert a.shape == (2700, 32738) and "celltype" in a.obs and "gene_ids" in a.var
    assert ad.read_h5ad(datasets.pbmc68k_reduced_path(), backed="r").shape == (700, 765)


def test_missing_optional_package_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not installed"):
        datasets._package_file("no_such_pkg_xyz", "f", install_hint="pip install it")
