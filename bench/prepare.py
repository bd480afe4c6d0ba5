"""
Throughput of model/prepare_dolly.py against two simpler ways of tokenizing the same Dolly records.

    (a) prepare       prepare_dolly.prepare() end to end into a temp dir: read + check the JSONL, drop empty and
                      duplicate records, split, tokenize with masks and categories, write shards + manifest.
    (b) plain loop    one process, no extras: json.loads each line, format_prompt + response, enc.encode_ordinary,
                      one uint16 array, np.save. The floor any preparation script pays.
    (c) datasets.map  nanoGPT-style: Dataset.from_list(records).map(tokenize), then np.save of the concatenation.

All three read the same file and share one tokenizer, built once before timing (a fixed start-up cost, the same
for all of them). Rounds are interleaved (a, b, c, a, b, c, ...) so drift in machine load hits all three alike; the
median round is reported, with the median CPU time of this process beside it (less disturbed when other jobs share
the machine). prepare tokenizes 256 records per call on several threads, which is how it can beat the plain loop
while doing more: the source hash, field checks, dedup and split, masks, categories and six fsync'ed files. Pinned
to one CPU (`taskset -c 0`: no threads) those extras show. Goals:
    prepare >= 0.9x the plain loop (the extras cost little)      prepare >= 2x datasets.map
The latest figures are in bench/README.md.

Run (CPU only, on the bundled 3,105-record sample by default; it prints PASS/MISS per goal, --strict exits 1 on a
MISS):
    python bench/prepare.py
    python bench/prepare.py --input databricks-dolly-15k.jsonl --rounds 7
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import prepare_dolly  # noqa: E402

GOALS = (("prepare", "plain loop", 0.9), ("prepare", "datasets.map", 2.0))  # (method, baseline, minimum speed ratio)

# -----------------------------------------------------------------------------
# the three methods; each reads `path`, writes under `out_dir` and returns the number of tokens it wrote


def run_prepare(path, out_dir, enc):
    args = prepare_dolly.get_args(["--input", path, "--output_dir", out_dir, "--quiet"])
    get_tokenizer = prepare_dolly.get_tokenizer
    prepare_dolly.get_tokenizer = lambda verbose=True: enc  # the same prebuilt tokenizer as the other two
    try:
        manifest, _ = prepare_dolly.prepare(args)
    finally:
        prepare_dolly.get_tokenizer = get_tokenizer
    return sum(manifest["splits"][split]["tokens"] for split in ("train", "val"))


def run_plain_loop(path, out_dir, enc):
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            text = prepare_dolly.format_prompt(r["instruction"], r["context"]) + r["response"].strip()
            ids += enc.encode_ordinary(text)
            ids.append(prepare_dolly.EOT)
    tokens = np.array(ids, dtype=np.uint16)
    np.save(os.path.join(out_dir, "plain.npy"), tokens)
    return len(tokens)


def run_datasets_map(path, out_dir, enc):
    import datasets
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]

    def process(r):
        ids = enc.encode_ordinary(prepare_dolly.format_prompt(r["instruction"], r["context"]) + r["response"].strip())
        ids.append(prepare_dolly.EOT)
        return {"ids": ids, "len": len(ids)}

    ds = datasets.Dataset.from_list(records)
    ds = ds.map(process, remove_columns=ds.column_names)
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in ds["ids"]])
    np.save(os.path.join(out_dir, "map.npy"), tokens)
    return len(tokens)


METHODS = {"prepare": run_prepare, "plain loop": run_plain_loop, "datasets.map": run_datasets_map}

# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description="Benchmark model/prepare_dolly.py against a plain loop and datasets.map.")
    p.add_argument("--input", default=prepare_dolly.BUNDLED_SAMPLE, help="Dolly JSONL file to tokenize")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds; the median is reported")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a goal is missed")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be positive, got {args.rounds}")
    import datasets
    datasets.disable_progress_bars()
    datasets.disable_caching()  # map() on an in-memory dataset writes nothing anyway; keep it that way

    t0 = time.perf_counter()
    enc = prepare_dolly.get_tokenizer(verbose=False)
    print(f"tokenizer built once in {time.perf_counter() - t0:.2f}s (not timed below)")
    with open(args.input, encoding="utf-8") as f:
        n_records = sum(1 for line in f if line.strip())

    seconds = {name: [] for name in METHODS}
    cpu_seconds = {name: [] for name in METHODS}  # this process's CPU time: less disturbed by other load
    tokens = {}
    tmp = tempfile.mkdtemp(prefix="bench-prepare-")
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms imports and caches and is not counted
            for name, fn in METHODS.items():
                out_dir = os.path.join(tmp, f"{name.replace(' ', '_')}-{round_}")
                os.makedirs(out_dir)
                t, cpu = time.perf_counter(), time.process_time()
                tokens[name] = fn(args.input, out_dir, enc)
                dt, dt_cpu = time.perf_counter() - t, time.process_time() - cpu
                shutil.rmtree(out_dir)
                if round_ > 0:
                    seconds[name].append(dt)
                    cpu_seconds[name].append(dt_cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"input: {os.path.relpath(args.input)} ({n_records:,d} records), median of {args.rounds} interleaved rounds")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    median_cpu = {name: statistics.median(s) for name, s in cpu_seconds.items()}
    for name in METHODS:
        print(f"  {name:13s} {median[name] * 1000:8.1f} ms | {n_records / median[name]:10,.0f} records/s | "
              f"{tokens[name] / median[name]:12,.0f} tokens/s | {tokens[name]:,d} tokens | "
              f"min {min(seconds[name]) * 1000:.1f} ms, max {max(seconds[name]) * 1000:.1f} ms | "
              f"cpu {median_cpu[name] * 1000:.1f} ms")
    # prepare writes fewer tokens than the other two (duplicates dropped), so compare records/s, i.e. time per input
    missed = 0
    for name, baseline, goal in GOALS:
        ratio = median[baseline] / median[name]
        ok = ratio >= goal
        missed += not ok
        print(f"{'PASS' if ok else 'MISS'}: {name} is {ratio:.2f}x {baseline} in records/s (goal >= {goal}x; "
              f"{median_cpu[baseline] / median_cpu[name]:.2f}x in CPU time)")
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
