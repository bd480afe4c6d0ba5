"""
Generation speed of model/finetune_dolly.py's generate() with the KV cache against without it.

    (a) KV cache    the prompt once, then one token per step against the cached keys/values of each layer
    (b) no cache    generate(use_cache=False), nanoGPT's loop: the whole sequence (prompt + everything generated so
                    far) through the model at every step, the output layer at the last position only

Greedy decoding of NEW_TOKENS (256) new tokens after a Dolly-style prompt, on a random-init model in fp32 (speed
does not depend on the weights). The EOT row of the output layer is zeroed (logit 0 loses to the best of 50,256
random logits) so that no run stops early, and both must produce the same tokens. Rounds are interleaved
(a, b, a, b, ...) so drift in machine load hits all alike; a short warm-up (16 tokens each) is not counted;
the median round is reported. Goal:
    KV cache >= 5x no cache in new tokens/s at 256 new tokens

Then, on the same model, the samples the trainer writes during training (write_samples): the manifest's val
instructions (--data_dir, one per category), 64 new tokens each with TrainConfig's temperature 0.8 and top-k 50 and a
seeded generator per prompt, (c) generate_batch, all prompts in one left-padded batch, against (d) generate() one
prompt at a time. In fp32 on a CPU both give the same tokens; the speed-up is printed (no goal).

Cached generation reads every weight once per new token (bound by memory bandwidth); the uncached loop recomputes
the whole sequence at every step (bound by compute, growing with the length). Latest figures: bench/README.md.

Run (CPU; most of the time goes to (b); the 124M shape takes far longer than the small one on a CPU, so run it on a
bigger machine or a GPU):
    python bench/generate.py
    python bench/generate.py --threads 2 --rounds 5
    python bench/generate.py --model quickstart
    python bench/generate.py --model both --device cuda
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network

import finetune_dolly as fd  # noqa: E402
from prepare_dolly import EOT, format_prompt, get_tokenizer  # noqa: E402

NEW_TOKENS = 256
GOAL = 5.0  # KV cache / no cache, new tokens per second
SHAPES = {  # name: (n_layer, n_head, n_embd, block_size); vocab 50304 as build-nanogpt
    "small": (6, 6, 384, 512),
    "quickstart": (4, 4, 128, 256),  # README's quick-start model
    "124M": (12, 12, 768, 1024),
}
PROMPT = format_prompt("Summarize the main idea of the text in two sentences.",
                       "Virgin Australia, the trading name of Virgin Australia Airlines Pty Ltd, is an "
                       "Australian-based airline. It is the largest airline by fleet size to use the Virgin brand.")

# -----------------------------------------------------------------------------


def build_model(shape, device):
    n_layer, n_head, n_embd, block_size = SHAPES[shape]
    torch.manual_seed(0)
    model = fd.GPT(fd.GPTConfig(block_size=block_size, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    with torch.no_grad():
        model.lm_head.weight[EOT] = 0.0  # a random model could pick EOT and stop early; make it lose to the others
    return model.to(device).eval()


METHODS = {
    "KV cache": lambda model, prompt, n: fd.generate(model, prompt, n, temperature=0, use_cache=True),
    "no cache": lambda model, prompt, n: fd.generate(model, prompt, n, temperature=0, use_cache=False),
}


def timed(fn, model, prompt, n, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(model, prompt, n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def interleaved_rounds(methods, model, inputs, n, rounds, device, warmup):
    """Times each of methods {name: fn(model, inputs, n)} in interleaved rounds (a, b, a, b, ...) after one warm-up
    call each (fn(model, *warmup): allocator, kernels, first-call costs). Returns ({name: seconds per round},
    {name: its output})."""
    for fn in methods.values():
        timed(fn, model, *warmup, device)
    seconds, outputs = {name: [] for name in methods}, {}
    for _ in range(rounds):
        for name, fn in methods.items():
            dt, outputs[name] = timed(fn, model, inputs, n, device)
            seconds[name].append(dt)
    return seconds, outputs


def report(seconds, new_tokens):
    """Prints a line per method; returns {name: median seconds}."""
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"  {name:22s} {median[name]:8.2f} s | {new_tokens / median[name]:8.1f} new tokens/s "
              f"(min {min(s):.2f} s, max {max(s):.2f} s)")
    return median


def bench(shape, prompt, rounds, device):
    """Returns {method: median seconds} and whether all methods produced the same tokens."""
    model = build_model(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    seconds, outputs = interleaved_rounds(METHODS, model, prompt, NEW_TOKENS, rounds, device, warmup=(prompt, 16))
    for name, out in outputs.items():
        if len(out) != NEW_TOKENS:
            raise SystemExit(f"{shape}: {name} generated {len(out)} tokens, not {NEW_TOKENS} (EOT or block size); "
                             f"the timing would be off")
    same = all(out == outputs["KV cache"] for out in outputs.values())
    print(f"{shape} ({n_params / 1e6:.1f}M params, {model.config.n_layer} layers, {model.config.n_embd} wide), "
          f"prompt {len(prompt)} + {NEW_TOKENS} new tokens, median of {rounds} interleaved rounds:")
    median = report(seconds, NEW_TOKENS)
    print(f"  same tokens from both: {'yes' if same else 'NO'}")
    return median, same


def bench_samples(shape, prompts, rounds, device):
    """The samples during training: write_samples' generate_batch (all prompts in one batch) against generate() one
    prompt at a time, with TrainConfig's sampling settings and a seeded generator per prompt. Prints the speed-up."""
    cfg = fd.TrainConfig()
    model = build_model(shape, device)
    prompts = [p for p in prompts if len(p) < model.config.block_size]
    if not prompts:
        print(f"{shape}: no sample prompt fits its {model.config.block_size}-token context; "
              f"training-samples comparison skipped")
        return

    def gens():
        return [torch.Generator(device=device).manual_seed(i) for i in range(len(prompts))]

    def one_at_a_time(m, ps, n):
        return [fd.generate(m, p, n, cfg.temperature, cfg.top_k, g) for p, g in zip(ps, gens())]

    def one_batch(m, ps, n):
        return fd.generate_batch(m, ps, n, cfg.temperature, cfg.top_k, gens())

    methods = {"one at a time": one_at_a_time, "one batch": one_batch}
    n = cfg.generate_max_tokens
    seconds, outputs = interleaved_rounds(methods, model, prompts, n, rounds, device, warmup=(prompts[:2], 8))
    lengths = f"{min(map(len, prompts))}-{max(map(len, prompts))}"
    print(f"{shape}: the training samples, {len(prompts)} prompts of {lengths} tokens x {n} new tokens "
          f"(temperature {cfg.temperature}, top-k {cfg.top_k}), median of {rounds} interleaved rounds:")
    median = report(seconds, sum(len(o) for o in outputs["one batch"]))
    same = outputs["one batch"] == outputs["one at a time"]
    # in fp32 on a CPU both give the same tokens (tested); other kernels (CUDA attention with a mask) may round
    # differently
    speedup = median["one at a time"] / median["one batch"]
    print(f"  same tokens from both: {'yes' if same else 'NO'}; one batch is {speedup:.1f}x one prompt at a time")


def main():
    p = argparse.ArgumentParser(description="Benchmark generate() with and without the KV cache.")
    p.add_argument("--model", default="small", choices=[*SHAPES, "both"], help="model shape (random init, vocab 50304)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch's choice; 1, as the other benches: on a shared machine other "
                        "jobs take the second core)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "dolly15k"),
                   help="prepared data, for the training samples' prompts")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be positive, got {args.rounds}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    enc = get_tokenizer(verbose=False)
    prompt = enc.encode_ordinary(PROMPT)
    manifest = os.path.join(args.data_dir, "manifest.json")
    if os.path.isfile(manifest):  # the val instructions the trainer samples from (model/prepare_dolly.py)
        with open(manifest) as f:
            sample_prompts = json.load(f)["sample_prompts"]
        prompts = [enc.encode_ordinary(format_prompt(p["instruction"], p["context"])) for p in sample_prompts]
    else:
        prompts = []
        print(f"no {manifest}: the training-samples comparison is skipped (run model/prepare_dolly.py)")
    print(f"device {args.device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")

    missed = 0
    for shape in (["small", "124M"] if args.model == "both" else [args.model]):
        if len(prompt) + NEW_TOKENS > SHAPES[shape][3]:
            print(f"{shape}: its {SHAPES[shape][3]}-token context cannot hold {len(prompt)} + {NEW_TOKENS} tokens; "
                  f"KV cache comparison skipped")
        else:
            median, same = bench(shape, prompt, args.rounds, args.device)
            ratio = median["no cache"] / median["KV cache"]
            ok = ratio >= GOAL and same
            missed += not ok
            print(f"{'PASS' if ok else 'MISS'}: {shape}: KV cache is {ratio:.1f}x no cache in new tokens/s "
                  f"at {NEW_TOKENS} new tokens (goal >= {GOAL:g}x{'' if same else '; and the tokens differ'})")
        if prompts:
            bench_samples(shape, prompts, args.rounds, args.device)  # a speed-up to read, no goal
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
