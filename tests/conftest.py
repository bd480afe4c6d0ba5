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


# build-nanogpt's train_gpt2.py pickles its config as __main__.GPTConfig, so its checkpoints are written by a script
NANOGPT_WRITER = r"""
import sys
from dataclasses import dataclass
import torch

@dataclass
class GPTConfig:  # build-nanogpt's train_gpt2.py, pickled as __main__.GPTConfig
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

sd_path, out_dir = sys.argv[1], sys.argv[2]
sd = torch.load(sd_path, weights_only=True)
config = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)
for prefix in ("_orig_mod.", "module."):  # torch.compile'd / DDP-wrapped model saved without unwrapping
    model = {prefix + k: v for k, v in sd.items()}
    torch.save({"model": model, "config": config, "step": 19072, "val_loss": 3.1}, f"{out_dir}/{prefix.strip('.')}.pt")
# nanoGPT without flash attention also saves each layer's causal-mask buffer
with_mask = dict(sd, **{f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)})
torch.save({"model": with_mask, "config": config, "step": 5000, "val_loss": 3.3}, f"{out_dir}/mask.pt")
"""
NANOGPT_CONFIG = dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)


def write_nanogpt_checkpoints(state_dict, out_dir):
    """build-nanogpt checkpoints of state_dict (a model of NANOGPT_CONFIG's shape) in out_dir: _orig_mod.pt and
    module.pt (keys of a compiled or DDP-wrapped model), mask.pt (with nanoGPT's causal-mask buffers)."""
    import torch
    torch.save(state_dict, os.path.join(out_dir, "sd.pt"))
    subprocess.run([PYTHON, "-c", NANOGPT_WRITER, os.path.join(out_dir, "sd.pt"), str(out_dir)], check=True,
                   timeout=120)
