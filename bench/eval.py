"""
Generation speed of model/eval_dolly.py's answers against Hugging Face transformers' generate().

    (a) eval_dolly  generate_answers(): the prompts sorted longest first, in batches of --batch_size, each batch
                    through fd.generate_batch (greedy, KV cache, left padding)
    (b) HF          GPT2LMHeadModel.generate(do_sample=False, use_cache=True) on the same batches: the same weights
                    converted to the Hugging Face layout in memory, left padding with an attention mask

The prompts are the first val examples of --data_dir (prepared Dolly shards; the bundled sample is prepared into a
temp folder when there are none) in eval_dolly's category-balanced order, those that leave room for the answer in
the model's context and are no longer than the shape's longest prompt. The models are random inits (speed does not
depend on the weights) in fp32 with the EOT row of the output layer zeroed, so that no answer stops early (a logit
of 0 loses to the best of 50,256 random logits) and both generate the same number of tokens; both must give the
same tokens. One warm-up call each, then rounds in alternating order (a, b, b, a, ...); the median round counts.
The CPU time of this process is printed too: on a shared box, wall time also counts what other processes take.
Goal, for the quick-start shape (a small model, whose steps are short enough for per-token overheads to show):
    eval_dolly >= 1.2x HF generate() in generated tokens/s (wall clock)
The 124M shape is printed for information: on a CPU its steps are the same large matmuls in both, so the two run at
about the same speed whatever the loop around them does.

Run (CPU, one thread as the other benches; a few minutes):
    python bench/eval.py                        # the quick-start shape, then 124M with fewer prompts and tokens
    python bench/eval.py --model quickstart --rounds 9
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network

import eval_dolly  # noqa: E402
import finetune_dolly as fd  # noqa: E402
from prepare_dolly import EOT, get_tokenizer  # noqa: E402

GOAL = 1.2  # eval_dolly / HF generate(), generated tokens per second
GOAL_SHAPES = ("quickstart",)  # the shapes the goal applies to (see the docstring)
SHAPES = {  # name: (n_layer, n_head, n_embd, block_size, prompts, batch_size, new tokens, longest prompt)
    "quickstart": (4, 4, 128, 256, 32, 16, 128, 128),  # config/quickstart.json's model
    # GPT-2 small: fewer, shorter prompts and fewer tokens, so a round takes seconds and decoding, not the prompt
    # pass (the same matmuls in both), is most of it
    "124M": (12, 12, 768, 1024, 8, 8, 48, 64),
}

# -----------------------------------------------------------------------------


def build_models(shape):
    """(ours, HF's): the same seeded random weights, vocab 50257 (so neither can pick a padding id), EOT zeroed."""
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd, block_size = SHAPES[shape][:4]
    torch.manual_seed(0)
    model = fd.GPT(fd.GPTConfig(block_size=block_size, vocab_size=50257, n_layer=n_layer, n_head=n_head,
                                n_embd=n_embd))
    with torch.no_grad():
        model.lm_head.weight[EOT] = 0.0  # tied to wte: the EOT embedding is zero too, which no prompt uses
    config = GPT2Config(vocab_size=50257, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)
    hf = GPT2LMHeadModel(config)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            v = v.t()  # nn.Linear's (out, in) -> HF Conv1D's (in, out)
        sd[k] = v.contiguous()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith(".attn.bias")]:
        raise SystemExit(f"weight conversion failed: missing {missing}, unexpected {unexpected}")
    return model.eval(), hf.eval()


def hf_answers(hf, prompts, max_new_tokens, batch_size):
    """HF generate() on eval_dolly's batches (longest prompts first), left-padded: the new tokens up to EOT."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    answers = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        P = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[EOT] * (P - len(prompts[i])) + prompts[i] for i in chunk])
        mask = torch.tensor([[0] * (P - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              use_cache=True, eos_token_id=EOT, pad_token_id=EOT)
        for i, row in zip(chunk, out[:, P:].tolist()):
            answers[i] = row[:row.index(EOT)] if EOT in row else row
    return answers


def timed(fn):
    """(wall seconds, CPU seconds of this process, fn's result)."""
    t, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - cpu, out


def bench(shape, examples, categories, rounds):
    """Prints the figures of one shape; returns (ratio, same tokens)."""
    n_layer, n_head, n_embd, block_size, n_prompts, batch_size, new_tokens, longest = SHAPES[shape]
    ours, hf = build_models(shape)
    order = eval_dolly.balanced_order(examples, categories)
    prompts = [examples[i].prompt_tokens for i in order
               if examples[i].prompt_len <= min(longest, block_size - new_tokens)][:n_prompts]
    methods = {"eval_dolly": lambda ps, n: eval_dolly.generate_answers(ours, ps, n, batch_size),
               "HF generate": lambda ps, n: hf_answers(hf, ps, n, batch_size)}
    for fn in methods.values():  # warm-up: allocator, kernels, first-call costs
        fn(prompts[:2], 4)
    seconds, cpu_seconds, outputs = {name: [] for name in methods}, {name: [] for name in methods}, {}
    for r in range(rounds):
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):  # a, b, b, a, ...: no order bias
            dt, cpu, outputs[name] = timed(lambda: methods[name](prompts, new_tokens))
            seconds[name].append(dt)
            cpu_seconds[name].append(cpu)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"{shape} ({n_params / 1e6:.1f}M params, {n_layer} layers, {n_embd} wide): {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens in batches of {batch_size}, {new_tokens} new "
          f"tokens each, median of {rounds} interleaved rounds:")
    rate, cpu_rate = {}, {}
    for name, s in seconds.items():
        tokens = sum(len(a) for a in outputs[name])
        rate[name] = tokens / statistics.median(s)
        cpu_rate[name] = tokens / statistics.median(cpu_seconds[name])
        print(f"  {name:12s} {statistics.median(s):7.2f} s | {rate[name]:8.1f} generated tokens/s "
              f"(min {min(s):.2f} s, max {max(s):.2f} s, {tokens} tokens) | {cpu_rate[name]:8.1f} per CPU second")
    same = outputs["eval_dolly"] == outputs["HF generate"]
    print(f"  same tokens from both: {'yes' if same else 'NO'}; per CPU second of this process (what other "
          f"processes on a shared box take does not count): {cpu_rate['eval_dolly'] / cpu_rate['HF generate']:.2f}x")
    return rate["eval_dolly"] / rate["HF generate"], same


def main():
    p = argparse.ArgumentParser(description="Benchmark eval_dolly's generation against transformers' generate().")
    p.add_argument("--model", default="both", choices=[*SHAPES, "both"], help="model shape (random init)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "dolly15k"), help="prepared data, for the prompts")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be positive, got {args.rounds}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
            data_dir = os.path.join(tmp, "data")
            print(f"no prepared data in {args.data_dir}/: preparing the bundled sample in a temp folder")
            subprocess.run([sys.executable, os.path.join(ROOT, "model", "prepare_dolly.py"), "--output_dir", data_dir,
                            "--quiet"], check=True, capture_output=True)
        manifest = fd.load_manifest(data_dir)
        examples = eval_dolly.read_examples(data_dir, manifest, get_tokenizer(verbose=False))
    print(f"cpu, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    missed = 0
    for shape in (list(SHAPES) if args.model == "both" else [args.model]):
        ratio, same = bench(shape, examples, manifest["categories"], args.rounds)
        ok = same and (ratio >= GOAL or shape not in GOAL_SHAPES)
        missed += not ok
        verdict = "info" if ok and shape not in GOAL_SHAPES else "PASS" if ok else "MISS"
        goal = f"goal >= {GOAL:g}x" if shape in GOAL_SHAPES else "no goal"
        print(f"{verdict}: {shape}: eval_dolly is {ratio:.2f}x HF generate() in generated tokens/s "
              f"({goal}{'' if same else '; and the tokens differ'})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
