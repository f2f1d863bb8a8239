#!/usr/bin/env bash
# Wheels for the packages run_gpu.sh needs that the lent GPU machine's image
# lacks. That image (2026-11: Python 3.12, jax/jaxlib 0.11.2 with the CUDA 13
# plugin, flax, optax, orbax-checkpoint, numpy, pillow, absl, etils, scipy,
# numba, ...) has no data stack (grain, TFDS, ml_collections, librosa) and
# reaches no registry, so they travel with the working tree as wheels.
# Everything else comes from the image: installing our own jax there would
# replace its CUDA build.
#
#   bash benchmarks/gpu_wheels.sh [DEST]       # here, default DEST=.whl
#
# then, on the device, carry [".whl"] and begin the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#     --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#
# The list is the dependency closure of setup.cfg's install_requires for
# Python 3.12 with jax 0.11.2, less what the image holds, plus pytest for
# the GPU path of the parity tests. Left out: PyAV (35
# MB; only video I/O, which no benchmark reads) so that the repository (36 MB)
# plus the wheels (~15 MB) stay under the 64 MiB a device call carries.
# Checked (2026-11-27) by installing these into a Python 3.12 environment with
# the image's other packages and running `SMOKE=1 bash benchmarks/run_gpu.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PKGS=(
  tensorflow-datasets==4.9.10 ml-collections==1.1.0 grain==0.2.18
  librosa==1.0.0 resampy==0.4.3 soundfile==0.14.0 tensorboardX==2.6.5
  array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0
  toml==0.10.2 portpicker==1.6.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12
  pooch==1.9.0 platformdirs==4.14.8 decorator==5.3.1
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0   # run_gpu.sh's tests
)
SDISTS=(promise==2.3)           # pure Python, published as a source archive only
PLATFORMS=()
for p in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
mkdir -p "$DEST"
PIP=(python3 -m pip)
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PKGS[@]}"
"${PIP[@]}" wheel -q --no-deps -w "$DEST" "${SDISTS[@]}"
n=$(ls "$DEST"/*.whl | wc -l)
echo "$n wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
