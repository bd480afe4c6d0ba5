"""
Memory and time per rank of a training step under --fsdp against DDP, at GPT-2 124M's shape, on CPU with gloo; and
the start-up memory estimate (fd.memory_estimate) against the measured peak.

For each number of processes (2 and 4) and each strategy, `torchrun --standalone` runs this file as workers that
build the model with the trainer's own code (fd.GPT, fd.parallelize, GPT.configure_optimizer,
fd.accumulate_gradients) and take a few AdamW steps on random tokens, then report:
    state   the bytes of this rank's parameters + gradients + AdamW state (under FSDP, its shards), taken after
            optimizer.step, when all three exist;
    peak    the process's resident-memory high-water mark during the steps (VmHWM, reset after the set-up) minus
            its resident memory just before the model was built: what the model, its training state and the
            step's activations and buffers take (with glibc returning freed blocks of 128 KiB and more);
    step    the median time of the steps after the first.
Goals: FSDP's per-rank state <= 0.55x DDP's at 2 processes and <= 0.3x at 4; the estimate within 20% of the
measured peak (0.8x-1.2x) for every run. Peak memory and step time are printed as ratios, without a goal.

Run (CPU; ~3-5 min on a 2-core VM, 4 runs of 4 steps; ~12 GB of memory for DDP at 4 processes):
    python bench/fsdp.py
    python bench/fsdp.py --n_layer 4 --n_embd 1600 --n_head 25     # gpt2-xl's width, fewer blocks
    python bench/fsdp.py --activation_checkpointing --batch_size 4 --sequence_length 512
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))

GOAL_STATE = {2: 0.55, 4: 0.3}  # FSDP's per-rank state / DDP's
GOAL_ESTIMATE = 0.2  # |estimate / measured peak - 1|


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# -----------------------------------------------------------------------------
# a worker (started by torchrun)

def worker(args):
    import torch
    import torch.distributed as dist
    import finetune_dolly as fd
    world = int(os.environ["WORLD_SIZE"])
    cfg = fd.TrainConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=1024,
                         batch_size=args.batch_size, sequence_length=args.sequence_length,
                         total_batch_size=args.batch_size * args.sequence_length * world, fsdp=args.strategy == "fsdp",
                         activation_checkpointing=args.activation_checkpointing, device="cpu", compile="off",
                         threads=1, loss_on="all")
    torch.set_num_threads(1)
    rank, local_rank, world, device = fd.setup_distributed(cfg)
    x = torch.randint(0, 50257, (args.batch_size, args.sequence_length), generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, 50257, x.shape, generator=torch.Generator().manual_seed(100 + rank))
    dist.barrier()
    before = rss_bytes("VmRSS")
    torch.manual_seed(0)
    model = fd.GPT(fd.GPTConfig(**{k: getattr(cfg, k) for k in fd.SHAPE_FIELDS}))
    train_model, _ = fd.parallelize(model, cfg, world, local_rank, device)
    optimizer = model.configure_optimizer(cfg, "cpu")
    seconds, state = [], None
    with open("/proc/self/clear_refs", "w") as f:  # the high-water mark from here on: the steps, not the set-up
        f.write("5")
    for step in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        fd.accumulate_gradients(train_model, [(x, y)], x.numel() * world, world, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if state is None:
            tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
            tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            state = sum(fd.local(t).numel() * fd.local(t).element_size() for t in tensors)
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    estimate = fd.memory_estimate(model.config, cfg, world, "float32")
    result = {"rank": rank, "state": state, "peak": rss_bytes("VmHWM") - before, "step": statistics.median(seconds[1:]),
              "estimate": estimate["total"], "estimate_parts": estimate}
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the comparison

def run(args, strategy, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--strategy", strategy, "--steps", str(args.steps), "--n_layer", str(args.n_layer),
           "--n_head", str(args.n_head), "--n_embd", str(args.n_embd), "--batch_size", str(args.batch_size),
           "--sequence_length", str(args.sequence_length)] + (["--activation_checkpointing"]
                                                              if args.activation_checkpointing else [])
    # glibc hands blocks of 128 KiB and more out as their own mappings and returns them when freed: the resident
    # high-water mark then follows the live tensors (as a GPU's max_memory_allocated does), not what malloc keeps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"{strategy} x {nproc} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    results = json.loads(lines[0][len("RESULT "):])
    return {k: max(res[k] for res in results) for k in ("state", "peak", "step", "estimate")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", default="2,4", help="numbers of processes, comma-separated")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--sequence_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    gib = 2 ** 30
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, vocab 50304; batch {args.batch_size} x "
          f"{args.sequence_length} per rank; fp32 on CPU (gloo), {args.steps} steps"
          + (", activation checkpointing" if args.activation_checkpointing else ""))
    print(f"{'run':12s} {'state GiB':>10s} {'peak GiB':>9s} {'estimate':>9s} {'est/peak':>9s} {'step s':>7s}")
    ok = True
    for nproc in (int(n) for n in args.processes.split(",")):
        measured = {}
        for strategy in ("ddp", "fsdp"):
            m = measured[strategy] = run(args, strategy, nproc)
            fit = m["estimate"] / m["peak"]
            ok &= abs(fit - 1) <= GOAL_ESTIMATE
            verdict = "PASS" if abs(fit - 1) <= GOAL_ESTIMATE else "MISS"
            sizes = f"{m['state'] / gib:10.2f} {m['peak'] / gib:9.2f} {m['estimate'] / gib:9.2f}"
            print(f"{strategy} x {nproc:<6d} {sizes} {fit:8.2f}x {m['step']:7.2f}  estimate {verdict}")
        ddp, fsdp = measured["ddp"], measured["fsdp"]
        state = fsdp["state"] / ddp["state"]
        goal = GOAL_STATE.get(nproc, 1.1 / nproc)
        ok &= state <= goal
        print(f"  FSDP / DDP at {nproc} processes: state {state:.2f}x (goal <= {goal}: "
              f"{'PASS' if state <= goal else 'MISS'}), peak {fsdp['peak'] / ddp['peak']:.2f}x, "
              f"step time {fsdp['step'] / ddp['step']:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
