#!/usr/bin/env bash
# One pass over what only a CUDA machine can check (no internet needed):
#   bench  bench/gpu.py: 124M, T=1024, bf16 + compile, tokens/s and MFU, response-only vs full, vs build-nanogpt math;
#   job    the guide's default job (124M, batch 16 x 1024, 524,288 tokens/step) from a random init under torchrun
#          (one process, so no process group: DDP and NCCL need two GPUs; the gloo tests cover DDP on a CPU):
#          2 steps, then --auto_resume with --max_steps 3: bf16, compile, fused AdamW, pinned copies, samples, and
#          checkpoints saved and loaded on the GPU. The bundled sample is ~0.5 of such a step, so the log warns
#          about epochs.
# First a short check that torch.compile works there; if not, both parts run uncompiled (and say so).
# Each part has a time limit, so a hang still leaves the other part's results.
# Usage: bash bench/gpu_check.sh [OUT_DIR [all|bench|job]]   (default gpu_check/ all: outputs, gpu.json, the job's
#        log.txt and metrics.jsonl; a relative OUT_DIR is taken from the repository root)
set -uo pipefail  # no -e: a failing part is reported and the other parts still run
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
part="${2:-all}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
rc=0
[ -f dolly15k/manifest.json ] || "$py" model/prepare_dolly.py --quiet || exit 1
compile=auto
compile_check="import torch
f = torch.compile(lambda x: x * 2)
assert f(torch.ones(2, device='cuda')).sum().item() == 4"
timeout -k 10 120 "$py" -c "$compile_check" \
    || { compile=off; echo "gpu_check: torch.compile does not work here; running uncompiled" | tee -a "$out/gpu.txt"; }
if [ "$part" = all ] || [ "$part" = bench ]; then
    timeout -k 20 330 "$py" bench/gpu.py --compile "$compile" --json "$out/gpu.json" 2>&1 | tee "$out/bench.txt" \
        || { rc=1; echo "gpu_check: bench/gpu.py failed or timed out"; }
fi
if [ "$part" = all ] || [ "$part" = job ]; then
    log_dir="$(mktemp -d)/logs_finetune"  # its 124M checkpoints (~1.5 GB each) stay out of OUT_DIR
    torchrun=("$py" -m torch.distributed.run --standalone --nproc_per_node 1)
    job=(model/finetune_dolly.py --pretrained_checkpoint none --log_dir "$log_dir" --generate_max_tokens 32
         --compile "$compile")
    timeout -k 20 180 "${torchrun[@]}" "${job[@]}" --max_steps 2 2>&1 | tee "$out/job.txt" \
        || { rc=1; echo "gpu_check: the job failed or timed out"; }
    timeout -k 20 150 "${torchrun[@]}" "${job[@]}" --max_steps 3 --auto_resume 2>&1 | tee -a "$out/job.txt" \
        || { rc=1; echo "gpu_check: the resumed job failed or timed out"; }
    cp "$log_dir/log.txt" "$log_dir/metrics.jsonl" "$out/" || rc=1
fi
exit $rc
