"""
What bench/train_step.py and bench/gpu.py share: their data, its batches, and the FLOPs per token of the model.

The data, by default: the bundled sample's first 111 records, the ones drawn from across the whole Dolly-15k file
(all eight categories, 53% of their tokens response tokens; the sample's other 2,994 records are all open_qa, with
short prompts, 75% response tokens together: see dolly15k/README.md). Response-only loss skips work in proportion to
the prompt tokens, so these records, not the whole sample, say what it gains on Dolly.
"""

import itertools
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))

import finetune_dolly as fd  # noqa: E402

SAMPLE = os.path.join(ROOT, "dolly15k", "dolly_sample.jsonl")
RECORDS = 111
DESCRIPTION = f"the bundled sample's {RECORDS} records drawn from across Dolly-15k"


def prepare_representative(out_dir):
    """Writes the records to out_dir and prepares them there with model/prepare_dolly.py; returns the shard dir."""
    with open(SAMPLE, encoding="utf-8") as f:
        lines = list(itertools.islice(f, RECORDS))
    categories = {json.loads(line)["category"] for line in lines}
    if len(lines) != RECORDS or len(categories) != 8:
        raise SystemExit(f"the first {RECORDS} records of {SAMPLE} should span Dolly's 8 categories, "
                         f"found {sorted(categories)}: pass --data_dir")
    source = os.path.join(out_dir, "dolly_representative.jsonl")
    with open(source, "w", encoding="utf-8") as f:
        f.writelines(lines)
    shards = os.path.join(out_dir, "shards")
    script = os.path.join(ROOT, "model", "prepare_dolly.py")
    cmd = [sys.executable, script, "--input", source, "--output_dir", shards, "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"preparing {DESCRIPTION} failed:\n{r.stdout[-1000:]}{r.stderr[-2000:]}")
    return shards


def dolly_batches(data_dir, B, T, n, loss_on):
    """n consecutive (x, y, num_targets) micro-batches of the train split from the project's DataLoader."""
    manifest = fd.load_manifest(data_dir)
    loader = fd.DataLoader(fd.TokenStream(data_dir, "train", manifest), B, T, 1, 0, 1, loss_on)
    out = []
    for _ in range(n):
        batches, num_targets = loader.next_step()
        out.append((*batches[0], num_targets))
    return out


def flops_per_token(model, T):
    """nanoGPT's estimate of a training step's FLOPs per token with the full loss: 6 N + 12 L T C, N = the GPT's
    parameters without the position embedding."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * model.config.n_layer * T * model.config.n_embd
