"""
Speed, MFU and peak memory of model/finetune_dolly.py's training step against two references, on real Dolly batches.

One optimizer step = forward + backward of one (B, T) micro-batch, clip_grad_norm_(1.0), fused AdamW step, zero_grad:

    ours        the project's step: fd.accumulate_gradients (GPT.forward with targets -> the chunked response-only
                loss TargetCrossEntropy, logits only at target positions), clip, model.configure_optimizer's AdamW
    nanogpt     build-nanogpt-equivalent math: the same GPT modules (wte + wpe, blocks, ln_f), then full logits
                lm_head(hidden) (B, T, V) and F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100)
    hf          transformers' GPT2LMHeadModel (GPT2Config of the same n_layer/n_head/n_embd/n_positions/vocab_size,
                dropout 0, attn_implementation="sdpa", use_cache=False), our weights copied in (Conv1D transposed).
                HF shifts `labels` by one inside the model, which would drop the last position's target; so it is
                called with shift_labels=y (transformers' ForCausalLMLoss then uses y as given, unshifted): it trains
                exactly the targets y of x that the other two train, -100 where masked.

All three: the same initial weights, the same fused AdamW (GPT.configure_optimizer's groups: decay on matrices, lr 6e-5,
betas 0.9/0.95, wd 0.01), clip 1.0, fp32, the same threads, the same batches, loss summed and divided by the batch's
target count. Batches come from the project's DataLoader (one per round, the same for every implementation):
--loss_on all (every next token is a target) and response (prompt targets are -100). The data, by default: the
bundled sample's first 111 records, the ones drawn from across the whole Dolly-15k file (all eight categories; the
other 2,994 are all open_qa, see dolly15k/README.md), prepared by model/prepare_dolly.py into a temp dir: 53% of
their tokens are response tokens (--data_dir dolly15k measures on what model/prepare_dolly.py put there: offline,
the whole bundled sample, 75% response tokens).

Timing: round 0 warms up (allocator, AdamW state) and is not counted; in each round ours, nanogpt and hf with the full
loss and a second copy of ours with the response-only loss each do one step on that round's batch, in rotating order;
median over rounds. Each round also times a big fp32 matmul (2048^3, best of 2) with the same threads: the "peak" MFU
is measured against (median over rounds). MFU = (6 N + 12 L T C) x tokens / step time / peak, N = parameters without
wpe (nanoGPT's estimate; the same nominal full-loss FLOPs for every row, so a response-only step that skips work shows
a higher "MFU").

Same math: with the full loss, every step's loss and gradient norm (before clipping) of nanogpt and hf are compared
with ours; round 0 is on identical fresh weights, later rounds after identical updates (the trajectories stay together
to float noise). Response-only: ours' loss and gradient norm on the fresh weights of round 0 against nanogpt's and
hf's full logits + cross_entropy on the same targets (computed before any update, not timed: their full-logits path
costs the same whatever the targets).

Peak memory (--memory; by default at the 124M shape, where the goal is): each implementation runs in its own child
process (this script, hidden --_child flag), which imports the same modules, reads the same batches, then builds its
model and optimizer and does 2 steps (ours once per --loss_on; nanogpt and hf once, their full-logits path costs the
same whatever the targets). Reported:
the peak RSS (VmHWM: whole process), that minus the RSS before the model was built ("training": weights, grads, AdamW
state, activations, logits) and the peak of step 2 above its start (VmHWM reset through /proc/self/clear_refs;
activations and logits only). The memory goal uses "training".

Goals (PASS/MISS printed for each; --strict exits 1 on a MISS):
    full loss, 124M shape: ours >= 1.0x nanogpt and >= 1.05x hf tokens/s (a MISS at >= 0.95x is flagged as inside
                           the noise floor); training peak memory <= 0.85x hf's
    response-only loss:    the speed-up of ours response over ours loss_on all >= 0.95 of its bound if time followed
                           FLOPs, at the 124M shape and on the small CPU quick-start model (4 layers, 4 heads, 128
                           wide, T 256, B 8); same loss as the full-logits reference to float tolerance
The bound: response-only loss skips the output layer at the prompt positions and nothing else. With s = the output
layer's share of the full-loss FLOPs (6 V C / (6 N + 12 L T C): ~86% on the small model, ~31% at the 124M shape
with T 128) times the share of prompt tokens in the timed batches, a step that took time in proportion to its FLOPs
would be 1 / (1 - s) times faster. That bound depends on the data (both shares are printed); the goal, a fraction of
it, says how much of the skipped work the step really saves.
The latest figures are in bench/README.md.

Run (CPU; run it on an idle machine):
    python bench/train_step.py
    python bench/train_step.py --configs small --rounds 12 --memory small
    python bench/train_step.py --configs 124m --seq_len 256 --batch 2 --threads 2 --no_memory
    python bench/train_step.py --data_dir dolly15k --no_memory     # after prepare_dolly.py; offline: the whole sample
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import finetune_dolly as fd  # noqa: E402
from common import DESCRIPTION, RECORDS, dolly_batches, flops_per_token, prepare_representative  # noqa: E402
import transformers  # noqa: E402  (imported by every child too, so their baseline memory is the same)
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 50304  # build-nanogpt's padded vocabulary
SHAPES = {  # name: (n_layer, n_head, n_embd, block_size)
    "small": (4, 4, 128, 256),  # the CPU quick-start model of finetune_dolly.py's docstring
    "124m": (12, 12, 768, 1024),  # GPT-2 small
}
IMPLS = ("ours", "nanogpt", "hf")
# transformers' Conv1D layers: HF stores these weights (in, out), nn.Linear (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GOAL_VS_NANOGPT, GOAL_VS_HF, NOISE_FLOOR = 1.0, 1.05, 0.95
GOAL_MEMORY = 0.85
GOAL_RESPONSE_OF_BOUND = 0.95  # response-only speed-up / its bound if time followed FLOPs, both shapes
LOSS_RTOL = 1e-4  # relative; fp32 sums over ~50k logits in different orders (chunked vs whole) differ at ~1e-6


# -----------------------------------------------------------------------------
# the three implementations

def build_model(impl, shape, seed=0, same_weights=True):
    """A fresh model; with same_weights, HF's gets a copy of the GPT's initial weights (the memory children skip that,
    so that the HF child never holds a second model)."""
    n_layer, n_head, n_embd, block_size = SHAPES[shape]
    torch.manual_seed(seed)
    if impl != "hf":
        config = fd.GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        return fd.GPT(config).train()
    config = GPT2Config(vocab_size=VOCAB, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(config)
    assert hf.lm_head.weight is hf.transformer.wte.weight and hf.config._attn_implementation == "sdpa"
    if not same_weights:
        return hf.train()
    gpt = build_model("ours", shape, seed)
    sd = {k: (v.t() if k.endswith(CONV1D) else v) for k, v in gpt.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, loaded through it
    if missing or unexpected:
        raise SystemExit(f"weights do not map onto GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    return hf.train()


def nanogpt_loss(model, x, y):
    """build-nanogpt's forward on the project's modules: full (B, T, V) logits, then one cross_entropy (summed)."""
    tr = model.transformer
    h = tr.wte(x) + tr.wpe(torch.arange(x.size(1), device=x.device))
    for block in tr.h:
        h = block(h)
    logits = model.lm_head(tr.ln_f(h))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=fd.IGNORE_INDEX,
                           reduction="sum")


def hf_loss(model, x, y):
    # shift_labels=y: the targets as given (see the docstring); num_items_in_batch=1: ForCausalLMLoss sums
    return model(input_ids=x, labels=y, shift_labels=y, num_items_in_batch=1, use_cache=False).loss


def train_step(impl, model, optimizer, x, y, num_targets):
    """One optimizer step; returns (mean loss over the targets, gradient norm before clipping)."""
    if impl == "ours":
        loss_sum = fd.accumulate_gradients(model, [(x, y)], num_targets, 1, "cpu")  # the project's own code path
    else:
        loss_sum = (nanogpt_loss if impl == "nanogpt" else hf_loss)(model, x, y)
        (loss_sum / max(1, num_targets)).backward()  # as accumulate_gradients: normalised by the step's targets
        loss_sum = loss_sum.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / max(1, num_targets), norm.item()


def make_optimizer(model):
    # GPT.configure_optimizer only reads self.parameters(): the same groups and fused AdamW for the HF model
    return fd.GPT.configure_optimizer(model, fd.TrainConfig(), "cpu")


def matmul_peak(n=2048, reps=2):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# -----------------------------------------------------------------------------
# memory: one child process per (shape, implementation, loss_on)

def proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def child(spec, args):
    shape, impl, loss_on = spec.split(":")
    B, T = shape_batch(shape, args)
    batches = dolly_batches(args.data_dir, B, T, 2, loss_on)
    rss0 = proc_status_kb("VmRSS")
    model = build_model(impl, shape, same_weights=False)
    optimizer = make_optimizer(model)
    train_step(impl, model, optimizer, *batches[0])
    rss1, peak1 = proc_status_kb("VmRSS"), proc_status_kb("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    train_step(impl, model, optimizer, *batches[1])
    peak2 = proc_status_kb("VmHWM")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork + exec (the parent holds the
    # benchmark's models), while VmHWM belongs to this process's own address space
    peak = max(peak1, peak2)
    print(json.dumps({"maxrss": peak, "training": peak - rss0, "step2": peak2 - rss1 if hwm_reset else None}))


def measure_memory(shape, args):
    """{(impl, loss_on): peaks}. nanogpt and hf run their full-logits path whatever the targets, so they are measured
    once (with the first --loss_on) and that figure stands for both; ours once per --loss_on."""
    specs = [(impl, args.loss_on[0]) for impl in IMPLS] + [("ours", lo) for lo in args.loss_on[1:]]
    out = {}
    for impl, loss_on in specs:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", f"{shape}:{impl}:{loss_on}",
               "--threads", str(args.threads), "--seq_len", str(args.seq_len), "--batch", str(args.batch),
               "--data_dir", args.data_dir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"memory child {shape}:{impl}:{loss_on} failed:\n{r.stderr[-2000:]}")
        out[impl, loss_on] = json.loads(r.stdout.strip().splitlines()[-1])
    for lo in args.loss_on[1:]:
        for impl in IMPLS[1:]:
            out[impl, lo] = dict(out[impl, args.loss_on[0]], same_as=args.loss_on[0])
    return out


# -----------------------------------------------------------------------------
# the benchmark

def shape_batch(shape, args):
    return (8, 256) if shape == "small" else (args.batch, args.seq_len)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def bench(shape, args):
    """Times the steps. Full loss: ours, nanogpt and hf, each its own model, one step per round in rotating order,
    their losses compared round by round (identical fresh weights, then identical updates). Response-only: a second
    copy of ours, one step per round next to the others; its loss and gradient norm on the fresh weights of round 0
    are compared with nanogpt's and hf's full-logits loss on the same targets, computed without an update (the
    full-logits path costs the same whatever the targets, so it is not timed twice)."""
    B, T = shape_batch(shape, args)
    n_layer, n_head, n_embd, _ = SHAPES[shape]
    batches = {lo: dolly_batches(args.data_dir, B, T, args.rounds + 1, lo) for lo in args.loss_on}
    if "response" in args.loss_on:  # round 0 (the same-math check on fresh weights) needs a batch with targets
        first = next((i for i, b in enumerate(batches["response"]) if b[2] > 0), 0)
        for lo in args.loss_on:
            batches[lo][0], batches[lo][first] = batches[lo][first], batches[lo][0]
    runs = [(impl, "all") for impl in IMPLS if "all" in args.loss_on]
    if "response" in args.loss_on:
        runs.append(("ours", "response"))
    models = {run: build_model(run[0], shape) for run in runs}
    optimizers = {run: make_optimizer(m) for run, m in models.items()}
    reference = {}  # impl: (loss, grad norm) of the full-logits loss on the response targets, fresh weights
    if "response" in args.loss_on:
        x, y, num_targets = batches["response"][0]
        for impl in IMPLS[1:]:
            model = models[impl, "all"] if (impl, "all") in models else build_model(impl, shape)
            loss = (nanogpt_loss if impl == "nanogpt" else hf_loss)(model, x, y)
            (loss / max(1, num_targets)).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            model.zero_grad(set_to_none=True)
            reference[impl] = (loss.item() / max(1, num_targets), norm.item())
    n_params = sum(p.numel() for p in models[runs[0]].parameters())
    fpt = flops_per_token(models[runs[0]], T)
    seconds = {run: [] for run in runs}
    record = {run: [] for run in runs}  # (loss, grad norm) per round
    peaks = []
    for r in range(args.rounds + 1):
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:
            x, y, num_targets = batches[run[1]][r]
            t = time.perf_counter()
            loss_norm = train_step(run[0], models[run], optimizers[run], x, y, num_targets)
            dt = time.perf_counter() - t
            record[run].append(loss_norm)
            if r > 0:
                seconds[run].append(dt)
        peaks.append(matmul_peak())
    del models, optimizers
    peak = statistics.median(peaks)
    tokens = B * T
    print(f"\n== {shape}: {n_params / 1e6:.1f}M params ({n_layer} layers, {n_head} heads, {n_embd} wide, "
          f"vocab {VOCAB}), B {B} x T {T} = {tokens} tokens/step, fp32, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} rounds")
    head = 6 * VOCAB * n_embd / fpt  # the output layer's share of the full-loss FLOPs
    flop_bound = None  # the response-only speed-up if time followed FLOPs
    for lo in args.loss_on:
        share = [b[2] / tokens for b in batches[lo][1:]]
        mean = sum(share) / len(share)
        skip = ""
        if lo == "response":
            skipped = head * (1 - mean)
            flop_bound = 1 / (1 - skipped)
            skip = (f"; the output layer skipped at the other {1 - mean:.0%} is {skipped:.0%} of the FLOPs "
                    f"(1 / (1 - that) = {flop_bound:.2f}x if time followed FLOPs)")
        print(f"   loss_on {lo:8s}: targets {min(share):.0%}-{max(share):.0%} of the tokens in the timed batches "
              f"(mean {mean:.0%}){skip}")
    print(f"   fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3, median of per-round bests "
          f"{min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f}); "
          f"model FLOPs {fpt / 1e6:.1f} M/token (6N + 12LTC, full loss)")
    print(f"   {'loss_on':8s} {'impl':8s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'min-max ms':>15s}   "
          f"vs ours (loss_on all)")
    median = {run: statistics.median(v) for run, v in seconds.items()}
    for run in runs:
        s = seconds[run]
        m = median[run]
        vs = ""
        if run != ("ours", "all") and ("ours", "all") in median:
            vs = f"ours {m / median['ours', 'all']:.2f}x faster"
        if run == ("ours", "response") and ("ours", "all") in median:
            vs = f"{median['ours', 'all'] / m:.2f}x faster than ours with the full loss"
        print(f"   {run[1]:8s} {run[0]:8s} {m * 1e3:9.1f} {tokens / m:10.0f} {fpt * tokens / m / peak:6.1%} "
              f"{min(s) * 1e3:7.0f}-{max(s) * 1e3:<7.0f}   {vs}")
    # the same math: loss and gradient norm of each step against ours
    same = {}
    print("   same math (relative difference to ours):")
    if "all" in args.loss_on:
        for impl in IMPLS[1:]:
            d_loss = [rel(a[0], b[0]) for a, b in zip(record[impl, "all"], record["ours", "all"])]
            d_norm = [rel(a[1], b[1]) for a, b in zip(record[impl, "all"], record["ours", "all"])]
            same[impl, "all"] = max(d_loss) <= LOSS_RTOL
            print(f"     all      {impl:8s} loss {record['ours', 'all'][0][0]:.6f} vs {record[impl, 'all'][0][0]:.6f}: "
                  f"round 0 (fresh weights) {d_loss[0]:.1e}, max over the rounds {max(d_loss):.1e} | "
                  f"grad norm round 0 {d_norm[0]:.1e}, max {max(d_norm):.1e}")
    if "response" in args.loss_on:
        ours = record["ours", "response"][0]
        for impl in IMPLS[1:]:
            d_loss, d_norm = rel(reference[impl][0], ours[0]), rel(reference[impl][1], ours[1])
            same[impl, "response"] = d_loss <= LOSS_RTOL and batches["response"][0][2] > 0
            print(f"     response {impl:8s} loss {ours[0]:.6f} vs {reference[impl][0]:.6f} "
                  f"(full logits, fresh weights): {d_loss:.1e} | grad norm {d_norm:.1e}")
    return {"median": median, "tokens": tokens, "same": same, "seconds": seconds, "flop_bound": flop_bound}


def ratio_line(same, ratio, goal, text, spread, floor=None):
    """PASS at or above the goal (with the same math); below it but at or above the floor: a MISS inside the noise."""
    if ratio >= goal and same:
        status = "PASS"
    elif floor is not None and ratio >= floor and same:
        status = f"MISS (inside the noise floor >= {floor:g}x)"
    else:
        status = "MISS"
    print(f"{status}: {text}: {ratio:.3f}x (goal >= {goal:g}x), per-round {spread}")
    return status == "PASS"


def per_round(res, a, b, scale=1.0, unit="x"):
    """min-max over rounds of time(b) / time(a) / scale: how far the ratio moves round to round."""
    r = [tb / ta / scale for ta, tb in zip(res["seconds"][a], res["seconds"][b])]
    return f"{min(r):.2f}-{max(r):.2f}{unit}"


def response_line(shape, res):
    """PASS when the response-only step's speed-up over the full-loss step is at least GOAL_RESPONSE_OF_BOUND of
    what skipping the output layer at the prompt positions would give if time followed FLOPs."""
    med, bound = res["median"], res["flop_bound"]
    speedup = med["ours", "all"] / med["ours", "response"]
    fraction = speedup / bound
    ok = fraction >= GOAL_RESPONSE_OF_BOUND
    spread = per_round(res, ("ours", "response"), ("ours", "all"), scale=bound, unit="")
    print(f"{'PASS' if ok else 'MISS'}: {shape} response-only loss vs the full-loss step (ours, tokens/s): "
          f"{speedup:.3f}x = {fraction:.3f} of its bound if time followed FLOPs, {bound:.3f}x "
          f"(goal >= {GOAL_RESPONSE_OF_BOUND:g}), per-round {spread}")
    print(f"     (vs build-nanogpt math with the full loss: {med['nanogpt', 'all'] / med['ours', 'response']:.2f}x)")
    return ok


def main():
    p = argparse.ArgumentParser(description="Benchmark the training step against build-nanogpt math and transformers.")
    p.add_argument("--configs", default="small,124m", help="comma list of: small, 124m")
    p.add_argument("--rounds", type=int, default=8,
                   help="timed rounds (after one warm-up round); the median is reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine, other jobs slow a second thread down)")
    p.add_argument("--seq_len", type=int, default=128, help="sequence length at the 124M shape (short on CPU)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step at the 124M shape")
    p.add_argument("--loss_on", default="all,response", help="comma list of: all, response")
    p.add_argument("--data_dir", default=None, help="shards from model/prepare_dolly.py (default: the bundled sample's "
                   f"{RECORDS} records drawn from across Dolly-15k, prepared into a temp dir: bench/common.py)")
    p.add_argument("--memory", default=None, help="comma list of the configs whose peak memory is measured in child "
                   "processes (default: 124m, where the goal is, when it runs; 'small,124m' adds the small model's)")
    p.add_argument("--no_memory", action="store_true", help="measure no peak memory (the same as --memory '')")
    p.add_argument("--strict", action="store_true", help="exit 1 if any goal is missed")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.loss_on = [s for s in args.loss_on.split(",") if s]
    torch.set_num_threads(args.threads)
    if args._child:
        return child(args._child, args)
    configs = [c.strip().lower() for c in args.configs.split(",") if c.strip()]
    unknown_loss_on = any(lo not in ("all", "response") for lo in args.loss_on)
    if not configs or any(c not in SHAPES for c in configs) or unknown_loss_on:
        p.error(f"--configs from {list(SHAPES)}, --loss_on from all,response")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.memory is None:  # the default: where the memory goal is, if that config runs
        args.memory = "124m" if "124m" in configs else ""
    args.memory = [] if args.no_memory else [c.strip().lower() for c in args.memory.split(",") if c.strip()]
    if any(c not in configs for c in args.memory):
        p.error(f"--memory takes configs that --configs runs ({','.join(configs)}); --no_memory for none")
    load = os.getloadavg()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        if args.data_dir is None:
            args.data_dir = prepare_representative(tmp)
            what = DESCRIPTION
        else:
            what = args.data_dir
        train = fd.load_manifest(args.data_dir)["splits"]["train"]
        print(f"data: {what}: train split {train['records']} records, {train['tokens']:,} tokens, "
              f"{train['response_tokens'] / train['tokens']:.0%} of them response")
        return run_benchmarks(configs, args, t_start)


def run_benchmarks(configs, args, t_start):
    results, memory = {}, {}
    for shape in configs:
        results[shape] = bench(shape, args)
        if shape in args.memory:
            memory[shape] = measure_memory(shape, args)
            print(f"   peak memory (MiB; child processes, 2 steps each): {'':10s} "
                  f"peak RSS   training   step 2   training vs hf")
            for lo in args.loss_on:
                for impl in IMPLS:
                    m = memory[shape][impl, lo]
                    step2 = f"{m['step2'] / 1024:8.0f}" if m["step2"] is not None else "       -"
                    note = f"   (= loss_on {m['same_as']}: the same full-logits path)" if "same_as" in m else ""
                    vs_hf = m["training"] / memory[shape]["hf", lo]["training"]
                    print(f"     {lo:8s} {impl:8s} {'':31s}{m['maxrss'] / 1024:9.0f} {m['training'] / 1024:10.0f} "
                          f"{step2} {vs_hf:9.2f}x{note}")

    print(f"\nload average now {os.getloadavg()[0]:.2f}; {time.time() - t_start:.0f} s")
    passed = []
    if "124m" in results and "all" in args.loss_on:
        res = results["124m"]
        med = res["median"]
        same = res["same"]["nanogpt", "all"] and res["same"]["hf", "all"]
        passed.append(ratio_line(same, med["nanogpt", "all"] / med["ours", "all"], GOAL_VS_NANOGPT,
                                 "124M full loss, ours vs build-nanogpt math, tokens/s",
                                 per_round(res, ("ours", "all"), ("nanogpt", "all")), NOISE_FLOOR))
        passed.append(ratio_line(same, med["hf", "all"] / med["ours", "all"], GOAL_VS_HF,
                                 "124M full loss, ours vs transformers GPT2LMHeadModel, tokens/s",
                                 per_round(res, ("ours", "all"), ("hf", "all")), NOISE_FLOOR))
        if not same:
            print("MISS: 124M full loss: the losses differ from the references beyond float tolerance")
        if "124m" in memory:
            m = memory["124m"]
            ratio = m["ours", "all"]["training"] / m["hf", "all"]["training"]
            ok = ratio <= GOAL_MEMORY
            passed.append(ok)
            whole = m["ours", "all"]["maxrss"] / m["hf", "all"]["maxrss"]
            print(f"{'PASS' if ok else 'MISS'}: 124M full loss, training peak memory ours / transformers: "
                  f"{ratio:.2f}x (goal <= {GOAL_MEMORY:g}x; whole process {whole:.2f}x)")
    if "response" in args.loss_on:
        for shape in configs:
            res = results[shape]
            med = res["median"]
            same = res["same"]["nanogpt", "response"] and res["same"]["hf", "response"]
            if "all" in args.loss_on:
                passed.append(response_line(shape, res))
            passed.append(same)
            print(f"{'PASS' if same else 'MISS'}: {shape} response-only loss equals the full-logits cross_entropy with "
                  f"ignore_index=-100 on the same batches (relative tolerance {LOSS_RTOL:g})")
    return 1 if args.strict and not all(passed) else 0


if __name__ == "__main__":
    sys.exit(main())
