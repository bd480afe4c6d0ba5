"""
README's table of memory per GPU for each GPT-2 size, from the trainer's own start-up estimate (fd.memory_estimate):
DDP against FSDP (--fsdp) on 8 GPUs, with and without --activation_checkpointing, at the guide's batch (16 x 1024
tokens per GPU), bf16 autocast on CUDA. bench/fsdp.py compares the estimate with measured peaks (on a CPU).

Run:
    python bench/memory_table.py                  # the table README.md shows (tests/test_tools.py checks they agree)
    python bench/memory_table.py --gpus 4 --batch_size 8
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))

import finetune_dolly as fd  # noqa: E402

SIZES = {"gpt2 (124M)": (12, 12, 768), "gpt2-medium (350M)": (24, 16, 1024), "gpt2-large (774M)": (36, 20, 1280),
         "gpt2-xl (1.5B)": (48, 25, 1600)}


def table(gpus=8, batch_size=16, sequence_length=1024):
    gib = 2 ** 30
    head = ["| model | state per GPU, DDP / FSDP | DDP | DDP + act. ckpt | FSDP | FSDP + act. ckpt |",
            "|---|---|---|---|---|---|"]
    rows = []
    for name, (n_layer, n_head, n_embd) in SIZES.items():
        config = fd.GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        cells, states = [], []
        for fsdp in (False, True):
            for checkpointing in (False, True):
                cfg = fd.TrainConfig(batch_size=batch_size, sequence_length=sequence_length, fsdp=fsdp,
                                     activation_checkpointing=checkpointing, device="cuda")
                parts = fd.memory_estimate(config, cfg, gpus, "bfloat16")
                cells.append(f"{parts['total'] / gib:.1f} GiB")
                if not checkpointing:
                    states.append((parts["weights"] + parts["gradients"] + parts["AdamW"]) / gib)
        rows.append(f"| {name} | {states[0]:.1f} / {states[1]:.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(head + rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sequence_length", type=int, default=1024)
    args = p.parse_args(argv)
    print(table(args.gpus, args.batch_size, args.sequence_length))


if __name__ == "__main__":
    main()
