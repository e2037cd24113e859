#!/usr/bin/env bash
# Every GPU check, as one script for one short GPU lease (docs/benchmarks.md records its output).
#
#   bench/gpu_all.sh            # on a machine with a CUDA GPU
#
# 1. the machine: GPU, driver, torch, bf16 support (what llm2clip's precision resolution reads);
# 2. bench/gpu_train_vision.sh: ViT-B/16 + adapter, bf16, ZeRO-1, batch 256 per GPU (the reference
#    setting) with CLIP and with SigLIP loss, each against a plain PyTorch loop (the peer), then
#    batch 512 with ZeRO-2 and gradient checkpointing (the memory-saving setting);
# 3. bench/gpu_embed.py: caption-embedding throughput (captions/s, tokens/s, MFU) of a Llama-3-8B-shaped
#    backbone (random weights) at bf16, packed inference vs the padded `transformers` forward (the peer)
#    on the same batches; its RESULT line feeds bench/bench_embed_workers.py --gpu-tokens-per-s;
# 4. the tests marked `gpu` (pytest -m gpu): packed inference and embed_captions workers on CUDA.
#
# A machine without our pins (the lent GPU machines have torch/transformers but not DeepSpeed or
# pydantic) installs wheels from .whl/ when that folder exists (see docs/benchmarks.md for how it
# was filled). Results also go to $OUT when that variable is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-$(mktemp -d)}
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 PYTHON=$PY
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import torch, transformers
from llm2clip.train.precision import resolve_precision
dev = torch.device("cuda")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}, capability {torch.cuda.get_device_capability()}, "
      f"auto precision -> {resolve_precision('auto', dev)}")
EOF

status=0
run() {  # name, then the arguments of bench/gpu_train_vision.sh
  local name=$1; shift
  echo "== train_vision: $*"
  bash bench/gpu_train_vision.sh "$@" 2>&1 | grep -v "^\[20[0-9][0-9]-" >"$OUT/$name.log"; local rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then status=1; grep -v "^\[rank" "$OUT/$name.log" | tail -25; grep "^\[rank0\]" "$OUT/$name.log" | tail -15
  else grep -E "^  |^RESULT" "$OUT/$name.log"; fi
}
run b256_clip                                                    # the reference setting, and the peer
run b256_siglip --loss siglip
run b512_zero2_gc --batch-size 512 --zero-stage 2 --gradient-checkpointing --steps 40 --no-peer
run b256_fp16 --precision fp16 --steps 30 --warmup 5 --no-peer           # the reference precision (loss scaling)
run l14_336 --shape vit-l-14-336 --batch-size 0 --gradient-checkpointing --steps 10 --warmup 3  # the paper's tower
run eva02_l14_336 --shape eva02-l-14-336 --batch-size 0 --gradient-checkpointing --steps 10 --warmup 3 --no-peer
echo "== embed_captions: packed vs padded forward (bench/gpu_embed.py)"
timeout 400 "$PY" bench/gpu_embed.py 2>&1 | grep -v "^\[20[0-9][0-9]-" >"$OUT/embed.log"; rc=${PIPESTATUS[0]}
if [[ $rc -ne 0 ]]; then status=1; tail -25 "$OUT/embed.log"; else grep -E "^gpu_embed|^\||^RESULT" "$OUT/embed.log"; fi
echo "== pytest -m gpu"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/unit/text/test_packed.py tests/unit/text/test_embed_workers.py 2>&1 | tail -15 || status=1
exit $status
