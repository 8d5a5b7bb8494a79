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


def test_census_download_pins_the_release_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def download_source_h5ad(dataset_id, to_path, census_version):
        calls.append((dataset_id, census_version))
        with open(to_path, "wb") as f:
            f.write(b"h5ad bytes")
        if dataset_id == "broken":
            raise ConnectionError("connection reset")

    monkeypatch.setitem(sys.modules, "cellxgene_census",
                        types.SimpleNamespace(download_source_h5ad=download_source_h5ad))
    path = datasets.census_download("abc", str(tmp_path / "dl"))
    assert path.endswith("abc.h5ad") and open(path, "rb").read() == b"h5ad bytes"
    assert calls == [("abc", datasets.CENSUS_VERSION)]
    assert datasets.census_download("abc", str(tmp_path / "dl")) == path and len(calls) == 1  # kept, no re-download
    with pytest.raises(ConnectionError):
        datasets.census_download("broken", str(tmp_path / "dl"))
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["abc.h5ad"]  # no broken.h5ad(.part)


def test_census_download_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cellxgene_census", None)  # import fails
    with pytest.raises(ImportError, match="pip install cellxgene-census"):
        datasets.census_download("abc", str(tmp_path))
