"""
The data bench/train_step.py and bench/gpu.py measure on by default: the bundled sample's first 111 records, the ones
drawn from across the whole Dolly-15k file (all eight categories, 53% of their tokens response tokens; the sample's
other 2,994 records are all open_qa, with short prompts, 75% response tokens together: see dolly15k/README.md).
Response-only loss skips work in proportion to the prompt tokens, so these records, not the whole sample, say what
it gains on Dolly.
"""

import itertools
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    cmd = [sys.executable, os.path.join(ROOT, "model", "prepare_dolly.py"), "--input", source, "--output_dir", shards, "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"preparing {DESCRIPTION} failed:\n{r.stdout[-1000:]}{r.stderr[-2000:]}")
    return shards
