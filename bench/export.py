"""
Speed of model/export_hf.py on a 124M GPT-2 (12 layers, 768 wide, block 1024, vocab 50304 as build-nanogpt), random
weights, against what any export has to do:

    (a) export        export_hf.export(checkpoint, out_dir): load the checkpoint by the tools' rule (fd.load_model)
                      and check it, convert, write model.safetensors, the tokenizer files, the configs and the model
                      card, fsync, rename the staging folder into place
    (b) reference     safetensors.torch.save_file of the same weights, already in HF's layout (contiguous tensors made
                      before the timing), plus export_hf.write_tokenizer into an empty folder: the bytes any export
                      writes, without reading the checkpoint, converting or fsync
    (c) load only     fd.load_model(checkpoint, mapped=True), the first step of (a) (with the CRC-32 check of every
                      byte), timed apart to show its share (no goal)

The checkpoint is a full fine-tune checkpoint by default (model, AdamW state, loader state, config: what
finetune_dolly.py saves) or, with --format nanogpt, build-nanogpt's {'model', 'config', 'step', 'val_loss'}. It is
read from the page cache (it was just written); both sides derive GPT-2's merges from the bundled ranks anew each
round, as a fresh process does. Rounds are interleaved (a, b, a, b, ...) after one untimed call each; medians.
Goal:
    (a) <= 1.5x (b)

Run (CPU; about 25 seconds with the default 5 rounds; needs ~4 GB of memory and ~3 GB in --work_dir):
    python bench/export.py
    python bench/export.py --format nanogpt --rounds 9
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network

import export_hf  # noqa: E402
import finetune_dolly as fd  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

GOAL = 1.5  # export / (save_file + tokenizer files)
SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)

# -----------------------------------------------------------------------------


def write_checkpoint(path, fmt):
    """A random 124M model saved as a fine-tune checkpoint (with a real AdamW state) or in build-nanogpt's format.
    Returns the converted tensors that an export of it writes."""
    torch.manual_seed(0)
    model = fd.GPT(fd.GPTConfig(**SHAPE))
    if fmt == "nanogpt":
        sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # saved from the compiled model
        torch.save({"model": sd, "config": SHAPE, "step": 19072, "val_loss": 3.1}, path)
    else:
        cfg = fd.TrainConfig(pretrained_checkpoint="none")
        optimizer = model.configure_optimizer(cfg, "cpu")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # allocates the AdamW moments, as after a real step
        model.zero_grad(set_to_none=True)
        torch.save({"format_version": fd.CHECKPOINT_VERSION, "model": model.state_dict(), "model_config": SHAPE,
                    "optimizer": optimizer.state_dict(), "step": 6, "val_loss": 2.5, "best_val_loss": 2.5,
                    "train_loader_state": {}, "config": asdict(cfg), "init_source": "random", "init_seed": cfg.seed,
                    "data_fingerprint": "", "world_size": 1}, path)
    return {name: t.contiguous() for name, t in export_hf.hf_tensors(model.eval()).items()}


def reference(tensors, out_dir):
    os.makedirs(out_dir)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    export_hf.write_tokenizer(out_dir, SHAPE["block_size"])


def timed(fn, out_dir):
    """Seconds fn(out_dir) takes, from a fresh start (no cached merges, no out_dir); removes out_dir afterwards."""
    export_hf.gpt2_vocab_merges.cache_clear()
    shutil.rmtree(out_dir, ignore_errors=True)
    t = time.perf_counter()
    fn(out_dir)
    dt = time.perf_counter() - t
    shutil.rmtree(out_dir)
    return dt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", choices=["finetune", "nanogpt"], default="finetune", help="checkpoint format")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work_dir", default=None, help="where the checkpoint and the exports go (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_export_", dir=args.work_dir)
    try:
        checkpoint = os.path.join(work, "model.pt")
        tensors = write_checkpoint(checkpoint, args.format)
        out_dir = os.path.join(work, "out")
        methods = {"export": lambda d: export_hf.export(checkpoint, d),
                   "save_file + tokenizer": lambda d: reference(tensors, d),
                   "load only": lambda d: os.makedirs(d) or fd.load_model(checkpoint, mapped=True)}
        for fn in methods.values():  # untimed: first-call costs (imports, allocator)
            timed(fn, out_dir)
        seconds = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                seconds[name].append(timed(fn, out_dir))
        size = os.path.getsize(checkpoint) / 2 ** 20
        n_params = sum(t.numel() for t in tensors.values())
        print(f"124M ({n_params / 1e6:.1f}M exported params, fp32), a {args.format} checkpoint of {size:,.0f} MiB, "
              f"{args.threads} thread(s), {fd.crc32.__module__}'s crc32, median of {args.rounds} interleaved rounds:")
        median = {name: statistics.median(s) for name, s in seconds.items()}
        for name, s in seconds.items():
            print(f"  {name:22s} {median[name]:6.2f} s (min {min(s):.2f}, max {max(s):.2f})")
        ratio = median["export"] / median["save_file + tokenizer"]
        print(f"export / (save_file + tokenizer files): {ratio:.2f}x (goal <= {GOAL}x): "
              f"{'PASS' if ratio <= GOAL else 'MISS'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
