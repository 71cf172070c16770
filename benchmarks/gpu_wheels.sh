#!/usr/bin/env bash
# Fill .whl/ (git ignores it) with the wheels benchmarks/gpu_check.sh installs on
# a GPU machine without network: Python 3.12, x86-64, where JAX with CUDA,
# flax, optax, numpyro, torch and lightning are already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-.whl}
mkdir -p "$DEST/optional"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}
# anndata and what it needs
get "$DEST" anndata==0.12.19 array-api-compat legacy-api-wrap natsort scverse-misc \
  session-info2 zarr donfig google-crc32c msgspec numcodecs
# scvi-tools 1.4.2 and what the machine lacks of its needs (scanpy's among them)
get "$DEST" scvi-tools==1.4.2 ml-collections mudata pyro-ppl pyro-api sparse scanpy \
  fast-array-utils pynndescent umap-learn scikit-misc
# mudata's settings (scverse-misc[settings]): pydantic and pydantic-settings
get "$DEST" pydantic pydantic-core annotated-types typing-inspection typing-extensions \
  pydantic-settings python-dotenv
python3 -m pip wheel -q --no-deps -w "$DEST" docrep==0.3.2   # published as source only
# installed only where the machine's pandas is 3 or newer (anndata 0.12 needs < 3)
get "$DEST/optional" "pandas<3" pytz tzdata
du -sh "$DEST"
