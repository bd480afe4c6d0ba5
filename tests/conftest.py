import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "model"))

# Tests never reach the network: the Hub and tiktoken's download are unreachable on CI anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def root():
    return ROOT


PYTHON = sys.executable
TINY = ["--pretrained_checkpoint", "none", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
        "--sequence_length", "64", "--batch_size", "4", "--total_batch_size", "1024", "--max_steps", "6",
        "--checkpoint_interval", "2", "--eval_interval", "2", "--generate_interval", "0", "--val_tokens", "2048",
        "--threads", "1", "--max_lr", "1e-3", "--min_lr", "1e-4"]


def prepare(out_dir, *extra):
    script = os.path.join(ROOT, "model", "prepare_dolly.py")
    subprocess.run([PYTHON, script, "--output_dir", str(out_dir), "--quiet", *extra],
                   check=True, capture_output=True, cwd=ROOT)
    return str(out_dir)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The bundled Dolly sample, prepared once per session (offline)."""
    return prepare(tmp_path_factory.mktemp("dolly"))


def trainer_cmd(data_dir, log_dir, *extra):
    script = os.path.join(ROOT, "model", "finetune_dolly.py")
    return [PYTHON, script, "--data_dir", str(data_dir), "--log_dir", str(log_dir), *TINY, *extra]


def run_trainer(data_dir, log_dir, *extra, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(trainer_cmd(data_dir, log_dir, *extra), capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def read_metrics(log_dir, drop=("tokens_per_sec",)):
    """metrics.jsonl without the timing fields, which differ from run to run."""
    with open(os.path.join(str(log_dir), "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]
