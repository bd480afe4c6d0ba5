"""
The training step on a GPU: GPT-2 124M at T=1024 with bf16 autocast + torch.compile, the way
model/finetune_dolly.py trains on CUDA, on real Dolly batches, against build-nanogpt's math in the same run.

    ours      the project's step: fd.accumulate_gradients (pinned, non-blocking copies; GPT.forward with targets ->
              TargetCrossEntropy, logits only at target positions), clip 1.0, fused AdamW, zero_grad; the transformer
              body compiled as the script compiles it (model.hidden_states), bf16 autocast.
              Twice: --loss_on all (every next token a target) and response (prompt targets are -100).
    nanogpt   build-nanogpt's train_gpt2.py step on the same modules: the whole model compiled, full (B, T, vocab)
              logits, F.cross_entropy, the same optimizer, clip and autocast; full loss.

Each implementation first does --warmup steps (torch.compile compiles here; not timed). Then --rounds rounds: in each,
every (implementation, loss_on) does --steps steps, in rotating order, timed with torch.cuda.synchronize around them;
the median round is reported. A bf16 8192^3 matmul is timed in the same run (the "measured" peak).
MFU = (6 N + 12 L T C) x tokens/s / peak (N = parameters without wpe; nanoGPT's estimate, the nominal full-loss FLOPs
for every row, so the response-only step that skips work shows a higher nominal MFU). The goal is read against the
data-sheet peak (dense bf16; H100/H200 SXM: 989 TFLOP/s) where the GPU is known, else against the measured peak.
Memory: the peak allocated during a step above what was allocated before it (activations, logits, gradients).

Goals (PASS/MISS): ours full loss MFU >= 45%; ours >= 1.0x nanogpt tokens/s; the response-only step's speed-up over
the full-loss step >= 0.95 of its bound if time followed FLOPs: 1 / (1 - s), s = the output layer's share of the
full-loss FLOPs (~27% at T=1024) times the share of prompt tokens in the timed batches (both printed).
Same math: the first step's loss of ours (all) and nanogpt on the same fresh weights and batch agree to bf16 tolerance.

The batches: by default from the bundled sample's 111 records drawn from across Dolly-15k (bench/common.py;
53% response tokens, as on the full Dolly more or less), which the script prepares into a temp dir; --data_dir takes
other shards. The latest figures are in bench/README.md.

Run on a CUDA machine (most of the time goes to compiling):
    python bench/gpu.py
    python bench/gpu.py --json gpu.json        # the figures as JSON too
    python bench/gpu.py --smoke                # any machine: a tiny fp32 model on the CPU, to check the script
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))

import finetune_dolly as fd  # noqa: E402
from common import DESCRIPTION, dolly_batches, flops_per_token, prepare_representative  # noqa: E402

# dense bf16, by a part of torch.cuda.get_device_name(); the first match counts, so the NVL (PCIe) cards come first
DATASHEET_BF16_TFLOPS = {"H200 NVL": 835.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "H100": 989.4,
                         "A100": 312.0}
GOAL_MFU = 0.45
GOAL_RESPONSE_OF_BOUND = 0.95  # response-only speed-up / its bound if time followed FLOPs (as bench/train_step.py)


class FullLogitsLoss(nn.Module):
    """build-nanogpt's forward: full logits, then one cross_entropy (summed; divided by the targets outside)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y):
        logits, _ = self.gpt(x)  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=fd.IGNORE_INDEX,
                               reduction="sum")


def make_model(args, device, seed=0):
    torch.manual_seed(seed)
    config = fd.GPTConfig(block_size=args.seq_len, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                          n_embd=args.n_embd)
    model = fd.GPT(config).to(device).train()
    return model, model.configure_optimizer(fd.TrainConfig(), device.type)


def step(impl, model, loss_fn, optimizer, batch, device, autocast):
    x, y, num_targets = batch
    if impl == "ours":
        loss_sum = fd.accumulate_gradients(model, [(x, y)], num_targets, 1, device, autocast)
    else:
        if device.type == "cuda":  # as accumulate_gradients
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with autocast:
            loss_sum = loss_fn(x, y)
        (loss_sum / max(1, num_targets)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(
        description="GPU step benchmark: 124M, T=1024, bf16 + compile, ours vs build-nanogpt math.")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (the guide's --batch_size)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation (compiling happens here)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data_dir", default=None, help="shards from model/prepare_dolly.py (default: " + DESCRIPTION +
                   ", prepared into a temp dir: bench/common.py)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile (auto: on for CUDA)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny fp32 model on the CPU, uncompiled: checks the script anywhere")
    args = p.parse_args()
    args.n_layer, args.n_head, args.n_embd = (12, 12, 768)
    if min(args.warmup, args.steps, args.rounds) < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    if args.smoke:
        args.n_layer, args.n_head, args.n_embd, args.batch, args.seq_len = 2, 2, 64, 2, 64
        args.warmup, args.steps, args.rounds = 1, 1, 2
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device; run it on a GPU machine (or --smoke to check the script on this one)")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    dtype, autocast = fd.pick_autocast(device.type, "float32" if args.smoke else "auto")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    print(f"torch {torch.__version__} | {name} | dtype {dtype} | compile {compiled} | "
          f"{args.n_layer} layers x {args.n_embd} | B {args.batch} x T {args.seq_len}")

    tmp = tempfile.TemporaryDirectory(prefix="gpu_bench_")  # removed when main returns
    data_dir = args.data_dir or prepare_representative(tmp.name)
    n_batches = args.warmup + args.rounds * args.steps
    batches = {lo: dolly_batches(data_dir, args.batch, args.seq_len, n_batches, lo) for lo in ("all", "response")}
    print(f"data: {args.data_dir or DESCRIPTION}")

    ours, ours_opt = make_model(args, device)
    ref, ref_opt = make_model(args, device)  # the same initial weights
    ref_loss = FullLogitsLoss(ref)
    if compiled:
        ours.hidden_states = torch.compile(ours.hidden_states)  # as finetune_dolly.py does on CUDA
        ref_loss = torch.compile(ref_loss)  # as build-nanogpt does: the whole model
    impls = {("ours", "all"): (ours, None, ours_opt), ("ours", "response"): (ours, None, ours_opt),
             ("nanogpt", "all"): (ref, ref_loss, ref_opt)}

    # same math: the first step, on identical fresh weights and the same batch
    first = {}
    t0 = time.time()
    for (impl, lo), (model, loss_fn, opt) in impls.items():
        for i in range(args.warmup):
            b = batches[lo][i]
            loss = step(impl, model, loss_fn, opt, b, device, autocast)
            if i == 0:
                first[impl, lo] = loss.item() / max(1, b[2])
    sync(device)
    print(f"warm-up ({args.warmup} steps each, compiling included): {time.time() - t0:.0f} s")
    tolerance = 2e-2 if dtype == "bfloat16" else 2e-3 if device.type == "cuda" else 1e-4  # bf16; TF32; fp32
    same = abs(first["ours", "all"] - first["nanogpt", "all"]) / abs(first["nanogpt", "all"]) <= tolerance

    seconds = {key: [] for key in impls}
    memory = {key: 0 for key in impls}
    keys = list(impls)
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            model, loss_fn, opt = impls[key]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            sync(device)
            t = time.perf_counter()
            for i in range(args.steps):
                step(key[0], model, loss_fn, opt, batches[key[1]][args.warmup + r * args.steps + i], device, autocast)
            sync(device)
            seconds[key].append((time.perf_counter() - t) / args.steps)
            if device.type == "cuda":
                memory[key] = max(memory[key], torch.cuda.max_memory_allocated() - before)

    mm_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    measured_peak = statistics.median(matmul_peak(device, mm_dtype, 256 if args.smoke else 8192) for _ in range(3))
    sheet = None  # the data sheet's dense bf16 peak, where the GPU is known
    if dtype == "bfloat16":
        sheet = next((v * 1e12 for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    fpt = flops_per_token(ours, args.seq_len)
    tokens = args.batch * args.seq_len
    print(f"matmul peak measured {measured_peak / 1e12:.1f} TFLOP/s ({mm_dtype}); data sheet "
          f"{'%.1f TFLOP/s' % (sheet / 1e12) if sheet else 'unknown for this GPU'}; model {fpt / 1e9:.3f} GFLOP/token")
    out = {"gpu": name, "data": args.data_dir or DESCRIPTION, "torch": torch.__version__, "dtype": dtype,
           "compile": compiled, "batch": args.batch, "seq_len": args.seq_len,
           "measured_peak_tflops": measured_peak / 1e12, "datasheet_tflops": sheet and sheet / 1e12,
           "first_loss": {f"{i}/{lo}": v for (i, lo), v in first.items()}, "rows": {}}
    print(f"{'impl':8s} {'loss_on':9s} {'ms/step':>8s} {'tokens/s':>10s} {'MFU sheet':>9s} {'MFU meas.':>9s} "
          f"{'step mem':>9s} {'targets':>8s}")
    median = {key: statistics.median(s) for key, s in seconds.items()}
    for key in keys:
        m = median[key]
        share = statistics.mean(b[2] for b in batches[key[1]]) / tokens
        mfu_sheet = fpt * tokens / m / sheet if sheet else None
        mfu_meas = fpt * tokens / m / measured_peak
        mfu_sheet_text = f"{100 * mfu_sheet:8.1f}%" if sheet else "       -"
        print(f"{key[0]:8s} {key[1]:9s} {m * 1e3:8.1f} {tokens / m:10,.0f} {mfu_sheet_text:>9s} "
              f"{100 * mfu_meas:8.1f}% {memory[key] / 2 ** 20:6.0f} MiB {share:8.0%}")
        out["rows"][f"{key[0]}/{key[1]}"] = {"ms_per_step": m * 1e3, "tokens_per_s": tokens / m,
                                             "mfu_datasheet": mfu_sheet, "mfu_measured": mfu_meas,
                                             "step_mem_mib": memory[key] / 2 ** 20, "target_share": share}

    mfu = fpt * tokens / median["ours", "all"] / (sheet or measured_peak)
    vs_nanogpt = median["nanogpt", "all"] / median["ours", "all"]
    timed = batches["response"][args.warmup:]  # the batches of the timed steps
    prompt_share = 1 - statistics.mean(b[2] for b in timed) / tokens
    skipped = 6 * ours.lm_head.weight.numel() / fpt * prompt_share  # the output layer's FLOPs response-only skips
    flop_bound = 1 / (1 - skipped)  # the response-only speed-up if time followed FLOPs
    speedup = median["ours", "all"] / median["ours", "response"]
    of_bound = speedup / flop_bound
    peak_kind = "data-sheet" if sheet else "measured"
    checks = [(mfu >= GOAL_MFU, f"ours full loss MFU {mfu:.1%} against the {peak_kind} peak (goal >= {GOAL_MFU:.0%})"),
              (vs_nanogpt >= 1.0, f"ours vs build-nanogpt math, full loss: {vs_nanogpt:.2f}x (goal >= 1.0x)"),
              (of_bound >= GOAL_RESPONSE_OF_BOUND,
               f"response-only vs full loss: {speedup:.2f}x = {of_bound:.2f} of its bound if time followed FLOPs, "
               f"{flop_bound:.2f}x (the output layer at the prompt positions is {skipped:.0%} of the FLOPs; "
               f"goal >= {GOAL_RESPONSE_OF_BOUND:g})"),
              (same, f"first-step loss ours {first['ours', 'all']:.5f} vs build-nanogpt math "
                     f"{first['nanogpt', 'all']:.5f}")]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'MISS'}: {text}")
    out["checks"] = [{"pass": ok, "what": text} for ok, text in checks]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
