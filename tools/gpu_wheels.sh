#!/usr/bin/env bash
# Download, for CPython 3.12 manylinux x86_64, exactly the wheels tools/gpu_acceptance.sh needs that the GPU test
# machine lacks (it has torch 2.11, transformers, peft, accelerate, safetensors, numpy, psutil, rich, typer,
# matplotlib, nvidia-ml-py; no package registry). Into .whl/ (git-ignored), at most 60 MiB: the whole tree that
# travels to that machine must stay under 64 MiB. Run it here, where pip works.
#
# Left out on purpose: PyAV (the check feeds synthetic latents, nothing is decoded) and bitsandbytes (its CUDA
# wheel alone is larger than the budget; nf4 is skipped with a line when it is absent).
#   bash tools/gpu_wheels.sh            # PIP=... to choose the pip; LIMIT_MIB=... to lower the cap
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
LIMIT_MIB=${LIMIT_MIB:-60}
DEST=.whl
# The versions lowvram is pinned to and tested with (pyproject.toml), and pydantic's own requirements.
WHEELS=(
  "diffusers==0.42.1"
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  # pydantic-core 2.50 needs typing-extensions >= 4.16; the machine's copy (a torch dependency) may be older.
  "typing-extensions==4.16.0"
  "torchao==0.18.0"
  # The machine has a peft of unknown version; torchao releases remove classes peft imports, so the peft this
  # torchao was checked with travels too (it shadows the installed one only inside the kit's target folder).
  "peft==0.21.2"
  "optimum-quanto==0.2.7"
)
rm -rf "$DEST.partial"
mkdir -p "$DEST.partial"
# --no-deps: everything else those wheels import is already on the GPU machine (numpy, safetensors,
# huggingface-hub, regex, requests, Pillow via matplotlib, filelock); ninja (quanto) only builds
# optional C++ extensions, which the check does not use.
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --dest "$DEST.partial" "${WHEELS[@]}"
bytes=$(du -cb "$DEST.partial"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -l "$DEST.partial"
if (( mib > LIMIT_MIB )); then
  echo "gpu_wheels: the wheels take ${mib} MiB, over the ${LIMIT_MIB} MiB limit: not installed into $DEST" >&2
  rm -rf "$DEST.partial"
  exit 1
fi
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "wheels=$(ls "$DEST"/*.whl | wc -l) wheel_mib=${mib}"
