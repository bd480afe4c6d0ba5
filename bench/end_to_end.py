"""
What a whole fine-tuning run of model/finetune_dolly.py costs beyond its training steps, and what a checkpoint save
costs beyond a durable torch.save.

    (a) run     fd.train(fd.TrainConfig(...)) in this process, into a fresh temp log dir: the loader, per-step logging
                (log.txt, metrics.jsonl), val loss at step 0, every eval_interval and at the end, generation samples
                (samples.jsonl/.md) as often, loss.png (if matplotlib is installed), full checkpoints (model_NNNNN.pt,
                model_best.pt, rotation) every checkpoint_interval and at the end. Timed from the step-0 evaluation
                (the end of start-up: parsing, data check, model, optimizer, tokenizer) to the return of fd.train.
    (b) bare    the same number of optimizer steps with nothing else: the same model and seed, GPT.configure_optimizer,
                the project's DataLoader, then per step get_lr, loader.next_step, fd.accumulate_gradients,
                clip_grad_norm_, optimizer.step, zero_grad. Its train losses must equal the run's (same work).
    overhead = (run - bare) / bare, in total and without the time the run spends in evaluate: evaluation runs as
    often and on as many tokens as --eval_interval and --val_tokens ask, so its cost is the user's choice, not the
    script's. Beside it, from the same run: the run's own step times (metrics.jsonl) and the time spent in evaluate,
    write_samples, refresh_plot and checkpoint saves (timers wrapped around fd's functions), so the overhead can be
    read without the run-to-run noise of two separate timings; and the CPU time of this process over (a) and (b),
    which other jobs on the machine disturb less than the wall time.

    (c) save    a full checkpoint as train() writes it: the dict of fd.checkpoint_state (model, AdamW state, loader
                position, RNG states, config, ...), fd.atomic_torch_save (temp file, fsync, rename, fsync of the
                directory) and prune_checkpoints, against (d) a durable atomic torch.save of the same state: torch.save
                to a temp file, fsync of the file, os.replace, fsync of the directory: the floor for a save that
                survives a power cut. For reference also (e): the same without the fsyncs. The state is taken after
                the bare steps.

    (f) verify  what checking a checkpoint's bytes against its zip CRC-32s costs, at GPT-2 124M's shape (weights and
                AdamW state, ~1.4 GiB), as a share of a plain torch.load(weights_only=True) of the file: a resume
                with DDP or one process loads with fd.safe_torch_load (the check in threads while torch.load reads
                the file), against that plain load; --fsdp ranks and the tools map the file instead (mmap=True,
                the tensors read where they are copied), against the same mapped load and copy without the check.
                The check alone (its CPU work) is printed beside them.

The run is README's CPU quick start, config/quickstart.json (30 steps; val loss at 0/10/20/30 on the whole val split,
samples at 0/15/30, checkpoints at 10/20/30).
--max_steps and --interval N (one interval for all three) shorten it; --set FIELD=VALUE ... changes any other setting.
(a) and (b) alternate (a, b, a, b, ...); (c), (d), (e) alternate over --save_rounds after one warm-up each; medians.

Goals (PASS/MISS; --strict exits 1 on a MISS):
    whole-run overhead without evaluation <= 5% of the bare step time (the total is printed for information)
    full checkpoint save <= 1.2x a durable atomic torch.save (with fsync of the file and the directory)
    verifying a 124M checkpoint's CRC-32s costs <= 0.3x the plain load
The latest figures are in bench/README.md.

Run (CPU; one round is a 30-step run plus 30 bare steps):
    python bench/end_to_end.py
    python bench/end_to_end.py --rounds 3 --save_rounds 9
    python bench/end_to_end.py --max_steps 10 --interval 5      # shorter; evals and samples weigh more per step
"""

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network

import finetune_dolly as fd  # noqa: E402

GOAL_OVERHEAD_EXCL_EVAL = 0.05  # (run - bare - time in evaluate) / bare
GOAL_SAVE = 1.2  # full checkpoint save / durable atomic torch.save (fsync of the file and the directory)
GOAL_VERIFY = 0.3  # (checked load - unchecked load) / plain torch.load, at 124M
with open(os.path.join(ROOT, "config", "quickstart.json")) as f:  # README's quick start; its log dir is a temp dir here
    QUICKSTART = {k: v for k, v in json.load(f).items() if k != "log_dir"}
TIMED = ("evaluate", "write_samples", "refresh_plot", "atomic_torch_save", "atomic_link", "prune_checkpoints")


# -----------------------------------------------------------------------------
# (a) the whole run, in this process

@contextlib.contextmanager
def timed_fd_functions():
    """Wraps fd's evaluate, write_samples, ... (train() calls them through the module) with timers; yields
    {name: [seconds per call]} and the perf_counter of the first evaluate call (the end of start-up)."""
    spent = {name: [] for name in TIMED}
    first_eval = []
    originals = {name: getattr(fd, name) for name in TIMED}

    def wrap(name, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            if name == "evaluate" and not first_eval:
                first_eval.append((t, time.process_time()))
            try:
                return fn(*a, **k)
            finally:
                spent[name].append(time.perf_counter() - t)
        return timed

    for name, fn in originals.items():
        setattr(fd, name, wrap(name, fn))
    try:
        yield spent, first_eval
    finally:
        for name, fn in originals.items():
            setattr(fd, name, fn)


def whole_run(cfg_kwargs, tmp_root):
    log_dir = tempfile.mkdtemp(prefix="run_", dir=tmp_root)  # fresh: no earlier checkpoints, no lock
    cfg = fd.TrainConfig(**cfg_kwargs, log_dir=log_dir)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # fd.train installs its own
    out = io.StringIO()
    try:
        with timed_fd_functions() as (spent, first_eval), contextlib.redirect_stdout(out):
            t0 = time.perf_counter()
            status = fd.train(cfg)
            t_end, cpu_end = time.perf_counter(), time.process_time()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if status != 0 or not first_eval:
        raise SystemExit(f"the run failed (status {status}):\n{out.getvalue()[-3000:]}")
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "train_loss" in r]
    files = sorted(os.listdir(log_dir))
    shutil.rmtree(log_dir)
    step_lines = [line for line in out.getvalue().splitlines() if line.startswith("step") and "| loss" in line]
    eval_start, eval_start_cpu = first_eval[0]
    return {"loop": t_end - eval_start, "loop_cpu": cpu_end - eval_start_cpu, "startup": eval_start - t0,
            "step_seconds": [cfg.total_batch_size / r["tokens_per_sec"] for r in steps],
            "losses": [r["train_loss"] for r in steps],
            "spent": {k: sum(v) for k, v in spent.items()}, "calls": {k: len(v) for k, v in spent.items()},
            "files": files, "last_line": step_lines[-1] if step_lines else "-"}


# -----------------------------------------------------------------------------
# (b) the same steps, bare

def bare_steps(cfg_kwargs):
    """Returns (seconds, CPU seconds, train losses, model, optimizer, loader, cfg, manifest) after max_steps bare
    optimizer steps."""
    cfg = fd.TrainConfig(**cfg_kwargs)
    torch.set_num_threads(cfg.threads)
    manifest = fd.load_manifest(cfg.data_dir)
    torch.manual_seed(cfg.seed)  # as train(): the same initial weights
    model = fd.GPT(fd.GPTConfig(**{k: getattr(cfg, k) for k in fd.SHAPE_FIELDS}))
    optimizer = model.configure_optimizer(cfg, "cpu")
    grad_accum = cfg.total_batch_size // (cfg.batch_size * cfg.sequence_length)
    stream = fd.TokenStream(cfg.data_dir, "train", manifest)
    loader = fd.DataLoader(stream, cfg.batch_size, cfg.sequence_length, grad_accum, 0, 1, cfg.loss_on)
    sums = []
    t, cpu = time.perf_counter(), time.process_time()
    for step in range(cfg.max_steps):
        lr = fd.get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches, num_targets = loader.next_step()
        loss_sum = fd.accumulate_gradients(model, batches, num_targets, 1, "cpu")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums.append((loss_sum, num_targets))
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return seconds, cpu, [s.item() / max(1, n) for s, n in sums], model, optimizer, loader, cfg, manifest


# -----------------------------------------------------------------------------
# (c) a full checkpoint save against (d) a durable atomic torch.save and (e) a plain one

def full_state(model, optimizer, loader, cfg, manifest, step):
    """The dict train()'s save_checkpoint writes."""
    return fd.checkpoint_state(model, optimizer, loader, cfg, step, fingerprint=fd.data_fingerprint(manifest))


def bench_save(model, optimizer, loader, cfg, manifest, rounds, tmp_root):
    d = tempfile.mkdtemp(prefix="save_", dir=tmp_root)
    state = full_state(model, optimizer, loader, cfg, manifest, cfg.max_steps)
    kinds = ("full", "plain", "durable")
    seconds = {k: [] for k in kinds}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for kind in kinds[r % 3:] + kinds[:r % 3]:
                t = time.perf_counter()
                if kind == "full":  # as train(): build the state, write it atomically and durably, rotate
                    s = full_state(model, optimizer, loader, cfg, manifest, cfg.max_steps)
                    fd.atomic_torch_save(s, os.path.join(d, fd.checkpoint_name(cfg.max_steps)))
                    fd.prune_checkpoints(d, cfg.keep_last_n_checkpoints)
                else:  # the floors: the same state, torch.save to a temp file + rename (durable: + fsync file, dir)
                    path = os.path.join(d, f"{kind}.pt")
                    with open(path + ".tmp", "wb") as f:
                        torch.save(state, f)
                        if kind == "durable":
                            f.flush()
                            os.fsync(f.fileno())
                    os.replace(path + ".tmp", path)
                    if kind == "durable":
                        dir_fd = os.open(d, os.O_RDONLY)
                        os.fsync(dir_fd)
                        os.close(dir_fd)
                dt = time.perf_counter() - t
                if r > 0:
                    seconds[kind].append(dt)
        size = os.path.getsize(os.path.join(d, "plain.pt"))
    finally:
        shutil.rmtree(d)
    return seconds, size


# -----------------------------------------------------------------------------
# (f) the CRC-32 check of a checkpoint, against the load itself

def bench_verify(rounds, tmp_root):
    """Median seconds of each kind of load (see the docstring's (f)) of a 124M-shaped checkpoint (weights and AdamW
    state after one step), written once to a temp dir; the page cache holds it, as after a save."""
    model = fd.GPT(fd.GPTConfig(vocab_size=50304))
    optimizer = model.configure_optimizer(fd.TrainConfig(), "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    d = tempfile.mkdtemp(prefix="verify_", dir=tmp_root)
    path = os.path.join(d, "model.pt")
    try:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        del model, optimizer

        def copy_all(state):  # what the model and the optimizer do with the loaded tensors
            tensors = [v for v in state["model"].values()] + [t for s in state["optimizer"]["state"].values()
                                                              for t in s.values() if torch.is_tensor(t)]
            return [t.clone() for t in tensors]

        kinds = {"plain": lambda: torch.load(path, weights_only=True),
                 "checked": lambda: fd.safe_torch_load(path),
                 "checked_mmap": lambda: copy_all(fd.safe_torch_load(path, mmap=True)),
                 "unchecked_mmap": lambda: copy_all(torch.load(path, weights_only=True, mmap=True)),
                 "check": lambda: fd.damaged_records(path)}
        seconds = {k: [] for k in kinds}
        for r in range(rounds + 1):  # round 0 warms up (and brings the file into the page cache)
            for kind in list(kinds)[r % 5:] + list(kinds)[:r % 5]:
                t = time.perf_counter()
                result = kinds[kind]()
                if r:
                    seconds[kind].append(time.perf_counter() - t)
                del result
        return {k: statistics.median(v) for k, v in seconds.items()}, os.path.getsize(path)
    finally:
        shutil.rmtree(d)


# -----------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(
        description="Benchmark a whole fine-tuning run against its bare training steps, and checkpoint saves.")
    p.add_argument("--rounds", type=int, default=1, help="(run, bare) pairs; the median is reported")
    p.add_argument("--save_rounds", type=int, default=5,
                   help="rounds of (full, durable, plain) saves after one warm-up round")
    p.add_argument("--max_steps", type=int, default=QUICKSTART["max_steps"], help="optimizer steps of the run")
    p.add_argument("--interval", type=int, default=None,
                   help="one eval, generate and checkpoint interval for all three "
                        "(default: the quick start's 10, 15 and 10; the trainer's default is 2)")
    p.add_argument("--threads", type=int, default=QUICKSTART["threads"], help="torch CPU threads")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "dolly15k"), help="shards from model/prepare_dolly.py")
    p.add_argument("--tmp_dir", default=None,
                   help="where the temp log dirs and checkpoints go (default: the system temp dir)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override any TrainConfig field, e.g. --set sequence_length=128 total_batch_size=8192 "
                        "(README's quick start)")
    p.add_argument("--verify_rounds", type=int, default=3,
                   help="rounds of the checkpoint check at 124M (0: skip it; it needs ~5 GB of memory)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any goal is missed")
    args = p.parse_args()
    if min(args.rounds, args.save_rounds, args.max_steps) < 1 or (args.interval is not None and args.interval < 1):
        p.error("--rounds, --save_rounds, --max_steps and --interval must be >= 1")
    cfg_kwargs = dict(QUICKSTART, max_steps=args.max_steps, threads=args.threads, data_dir=args.data_dir)
    if args.interval is not None:
        cfg_kwargs.update(eval_interval=args.interval, generate_interval=args.interval,
                          checkpoint_interval=args.interval)
    fields = {f.name: f for f in dataclasses.fields(fd.TrainConfig)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields or name in ("log_dir", "auto_resume", "resume", "checkpoint_path") or not value:
            p.error(f"--set {item}: expected FIELD=VALUE with a TrainConfig field other than log_dir and the "
                    f"resume ones")
        kind = type(fields[name].default)
        cfg_kwargs[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    args.max_steps, args.interval = cfg_kwargs["max_steps"], cfg_kwargs["eval_interval"]
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("config: " + " ".join(f"--{k} {v}" for k, v in cfg_kwargs.items() if k != "data_dir"))
    t_start = time.time()

    runs, bares = [], []
    for r in range(args.rounds):
        runs.append(whole_run(cfg_kwargs, args.tmp_dir))
        seconds, cpu, losses, model, optimizer, loader, cfg, manifest = bare_steps(cfg_kwargs)
        bares.append({"seconds": seconds, "cpu": cpu, "losses": losses})
        print(f"  round {r + 1}: run loop {runs[-1]['loop']:.1f} s (start-up {runs[-1]['startup']:.1f} s before it), "
              f"bare steps {seconds:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    loop = statistics.median(r["loop"] for r in runs)
    loop_excl_eval = statistics.median(r["loop"] - r["spent"]["evaluate"] for r in runs)
    bare = statistics.median(b["seconds"] for b in bares)
    loop_cpu = statistics.median(r["loop_cpu"] for r in runs)
    bare_cpu = statistics.median(b["cpu"] for b in bares)
    run = sorted(runs, key=lambda r: r["loop"])[(len(runs) - 1) // 2]  # the median run, for the breakdown
    in_run_steps = sum(run["step_seconds"])
    in_run_rest = run["loop"] - in_run_steps
    loss_pairs = [(a, b) for r, b_ in zip(runs, bares) for a, b in zip(r["losses"], b_["losses"])]
    same = max((abs(a - b) / abs(b) for a, b in loss_pairs), default=float("inf"))
    same = same if all(len(r["losses"]) == args.max_steps for r in runs) else float("inf")
    overhead = (loop - bare) / bare
    overhead_excl_eval = (loop_excl_eval - bare) / bare
    overhead_cpu = (loop_cpu - bare_cpu) / bare_cpu
    tokens = cfg_kwargs["total_batch_size"] * args.max_steps
    intervals = f"{cfg_kwargs['eval_interval']}/{cfg_kwargs['generate_interval']}/{cfg_kwargs['checkpoint_interval']}"
    print(f"\n== whole run: {args.max_steps} steps x {cfg_kwargs['total_batch_size']:,} tokens, "
          f"eval/samples/checkpoint every {intervals} steps, median of {args.rounds} round(s)")
    print(f"   {'':26s} {'wall':>9s} {'tokens/s':>9s} {'CPU time':>9s}")
    print(f"   {'run loop (after start-up)':26s} {loop:8.1f}s {tokens / loop:9.0f} {loop_cpu:8.1f}s   "
          f"files: {' '.join(run['files'])}")
    print(f"   {'bare steps':26s} {bare:8.1f}s {tokens / bare:9.0f} {bare_cpu:8.1f}s")
    print(f"   {'overhead':26s} {loop - bare:8.1f}s {'':9s} {loop_cpu - bare_cpu:8.1f}s   "
          f"= {overhead:.1%} of the bare steps (CPU time: {overhead_cpu:.1%})")
    print(f"   {'overhead without evaluate':26s} {loop_excl_eval - bare:8.1f}s {'':9s} {'':9s}   "
          f"= {overhead_excl_eval:.1%} of the bare steps")
    print(f"   within the median run: its {args.max_steps} steps {in_run_steps:.1f} s "
          f"(metrics.jsonl; {(in_run_steps - bare) / bare:+.1%} vs bare), "
          f"the rest {in_run_rest:.1f} s = {in_run_rest / in_run_steps:.1%} of its steps:")
    accounted = 0.0
    for name in TIMED:
        spent = run["spent"][name]
        accounted += spent
        print(f"     {name:18s} {spent:7.2f} s  {run['calls'][name]:3d} calls  {spent / in_run_steps:6.1%}")
    other = in_run_rest - accounted
    print(f"     {'logging, other':18s} {other:7.2f} s             {other / in_run_steps:6.1%}")
    print(f"   same train losses in the run and the bare steps: {'yes' if same < 1e-6 else 'NO'} "
          f"(max relative difference {same:.1e})")
    print(f"   last step of the run: {run['last_line']}")

    save_seconds, size = bench_save(model, optimizer, loader, cfg, manifest, args.save_rounds, args.tmp_dir)
    full, plain, durable = (statistics.median(save_seconds[k]) for k in ("full", "plain", "durable"))
    print(f"\n== checkpoint save: {size / 2**20:.1f} MiB (model + AdamW state + loader, RNG, config), "
          f"median of {args.save_rounds} rounds")
    labels = {"full": "full save (state + fd.atomic_torch_save + prune)",
              "durable": "torch.save to tmp, fsync, os.replace, fsync dir",
              "plain": "  the same without the fsyncs"}
    for kind, label in labels.items():
        s = save_seconds[kind]
        print(f"   {label:50s} {statistics.median(s) * 1e3:8.1f} ms  (min {min(s) * 1e3:.1f}, max {max(s) * 1e3:.1f})")

    if args.verify_rounds:
        verify, size = bench_verify(args.verify_rounds, args.tmp_dir)
        print(f"\n== checkpoint check: 124M weights + AdamW state, {size / 2**30:.2f} GiB, median of "
              f"{args.verify_rounds} rounds")
        for kind, label in (("plain", "torch.load(weights_only=True)"),
                            ("checked", "fd.safe_torch_load: the same, with the CRC-32 check"),
                            ("unchecked_mmap", "mapped load (mmap=True) + copy of every tensor"),
                            ("checked_mmap", "fd.safe_torch_load(mmap=True) + copy: with the check"),
                            ("check", "the CRC-32 check alone")):
            print(f"   {label:55s} {verify[kind]:7.2f} s")

    print(f"\nload average now {os.getloadavg()[0]:.2f}; {time.time() - t_start:.0f} s")
    results = []
    results.append(overhead_excl_eval <= GOAL_OVERHEAD_EXCL_EVAL and same < 1e-6)
    print(f"{'PASS' if results[-1] else 'MISS'}: whole-run overhead without evaluation {overhead_excl_eval:.1%} of the "
          f"bare step time (goal <= {GOAL_OVERHEAD_EXCL_EVAL:.0%}; evaluate runs as often as --eval_interval and "
          f"--val_tokens ask)")
    in_run_excl_eval = (in_run_rest - run["spent"]["evaluate"]) / in_run_steps
    print(f"      for information, in total: {overhead:.1%} (CPU time {overhead_cpu:.1%}); within the run, against "
          f"its own steps: {in_run_rest / in_run_steps:.1%}, without evaluate {in_run_excl_eval:.1%}")
    results.append(full / durable <= GOAL_SAVE)
    print(f"{'PASS' if results[-1] else 'MISS'}: full checkpoint save {full / durable:.2f}x a durable atomic "
          f"torch.save with fsync (goal <= {GOAL_SAVE:g}x; {full / plain:.2f}x the same without fsync)")
    if args.verify_rounds:
        cost = (verify["checked"] - verify["plain"]) / verify["plain"]
        mapped = (verify["checked_mmap"] - verify["unchecked_mmap"]) / verify["plain"]
        results.append(cost <= GOAL_VERIFY)
        print(f"{'PASS' if results[-1] else 'MISS'}: checking a 124M checkpoint's CRC-32s as a resume loads it costs "
              f"{cost:.2f}x its plain load (goal <= {GOAL_VERIFY:g}x); mapped (--fsdp, the tools): {mapped:.2f}x; the "
              f"check alone, in {min(8, os.cpu_count() or 1)} threads with {fd.crc32.__module__}'s crc32: "
              f"{verify['check'] / verify['plain']:.2f}x")
    return 1 if args.strict and not all(results) else 0

if __name__ == "__main__":
    sys.exit(main())
