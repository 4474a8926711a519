#!/usr/bin/env bash
# Unsloth's packages for the GPU machine, as one zip: bench.unsloth_bench runs with them first on its path.
#
#   bench/unsloth_site.sh [OUT_DIR]     # writes OUT_DIR/unsloth_site.zip (default OUT_DIR: .device), ~15 MB
#
# There (the GPU machine has no package index):
#   python3 -m zipfile -e .device/unsloth_site.zip /tmp/unsloth_site
#   python -m bench.train_bench --out OUT --runs b,unsloth,c --unsloth-site /tmp/unsloth_site
#
# The GPU machine's Python 3.12 already holds torch 2.11, transformers 5.17.0 (the newest Unsloth allows),
# accelerate, huggingface_hub 1.x, tokenizers, safetensors, pillow, aiohttp, requests, rich, pyyaml and regex, so the
# zip carries only what it lacks: Unsloth and its own pins (trl <= 1.15, datasets < 5), xformers 0.0.35 (the first
# release built for any torch >= 2.10 rather than for one), and the rest of Unsloth's requirements. Left out:
# Unsloth's studio/ app (~25 MB of its wheel), bitsandbytes' libraries for CUDA releases other than 13.x and the CPU,
# diffusers and hf_transfer (required by Unsloth's metadata, never imported by a text model's training).
#
# The same versions check the script on a CPU (Unsloth's CPU mode trains SFT only):
#   python3 -m venv /tmp/unsloth-venv && /tmp/unsloth-venv/bin/pip install torch==2.13.0
#   /tmp/unsloth-venv/bin/pip install transformers==5.17.0 accelerate huggingface_hub pillow aiohttp psutil \
#       sentencepiece protobuf einops regex requests rich pyyaml  # what the GPU machine has
#   /tmp/unsloth-venv/bin/pip install --no-deps $(bench/unsloth_site.sh --list)
#   PYTHONPATH=$PWD /tmp/unsloth-venv/bin/python -m bench.unsloth_bench --out /tmp/unsloth_out --smoke
set -euo pipefail
pins="unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 peft==0.21.2 bitsandbytes==0.50.2
torchao==0.18.0 cut-cross-entropy==25.1.1 xformers==0.0.35 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
fsspec==2026.2.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 msgspec==0.22.0 json5==0.17.3
nest-asyncio==1.6.0 structlog==26.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5"
if [[ ${1:-} == --list ]]; then
  echo $pins
  exit 0
fi
out=${1:-.device}
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$dl" $pins
mkdir -p "$out"
rm -f "$out/unsloth_site.zip"
python3 - "$dl" "$out/unsloth_site.zip" <<'PY'
import os, sys, zipfile
src, dst = sys.argv[1:]
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as o:
    for f in sorted(os.listdir(src)):
        with zipfile.ZipFile(os.path.join(src, f)) as z:
            for i in z.infolist():
                base = os.path.basename(i.filename)
                if i.filename.startswith("studio/"):
                    continue
                if base.startswith("libbitsandbytes_") and not ("cuda13" in base or "cpu" in base):
                    continue
                o.writestr(i, z.read(i.filename))
PY
ls -la "$out/unsloth_site.zip"
