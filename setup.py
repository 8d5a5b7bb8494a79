"""Build the packages and their C++ extensions (csrc/): ``sigattn._C`` (op schemas + CPU kernels) and
``data_prep._mds_cells`` (MDS sample packing, csrc/mds_cells.cpp).

CPU only (no nvcc needed; the CUDA kernels are Triton, registered from Python). Either
``pip install --no-build-isolation --no-deps -e .`` or ``python setup.py build_ext --inplace``.
"""

from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
MDS_CELLS = "csrc/mds_cells.cpp"
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp") if str(p.relative_to(ROOT)) != MDS_CELLS)

setup(
    name="sigattn",
    version="0.1.0",
    description="Sigmoid-attention ops (C++ CPU, Triton CUDA) and a single-cell foundation-model training stack",
    python_requires=">=3.10",
    packages=find_packages(include=["sigattn*", "data_prep*", "training*", "launch*"]),
    package_data={"data_prep": ["gene_tables/*.csv.gz", "gene_tables/README.md"]},
    ext_modules=[
        CppExtension(
            name="sigattn._C",
            sources=SOURCES,
            include_dirs=[str(ROOT / "csrc")],
            # ATen's parallel_for uses the OpenMP backend of the torch build; -fopenmp makes its pragmas live here.
            extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        ),
        CppExtension(name="data_prep._mds_cells", sources=[MDS_CELLS], extra_compile_args={"cxx": ["-O3"]}),
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
