"""
Fine-tune a GPT-2 on the Databricks Dolly-15k instruction data (shards from model/prepare_dolly.py).

The model to start from is, in this order: a fine-tune checkpoint (with --auto_resume / --resume), the checkpoint
you pretrained with build-nanogpt's train_gpt2.py (--pretrained_checkpoint, default logs/model_19072.pt; a Hub name
like `gpt2` works too), else a random init (with a warning).

Launch:
    python model/finetune_dolly.py                                     # one process (GPU or CPU)
    python model/finetune_dolly.py --auto_resume                       # continue after a crash or preemption
    python model/finetune_dolly.py --resume --checkpoint_path logs_finetune/model_00004.pt --max_lr 1e-5
    torchrun --standalone --nproc_per_node=8 model/finetune_dolly.py   # one node, 8 GPUs
    python model/finetune_dolly.py --config config/quickstart.json     # tiny CPU run from a random init

Exit status: 0 done; 1 error, bad flag values included (one line says what to do); 2 unparsable command line;
75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun with --auto_resume).
"""

import argparse
import dataclasses
import fcntl
import gc
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import time
import struct
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from mmap import ACCESS_READ, mmap as map_file

# -----------------------------------------------------------------------------
# first, before the heavy imports: a worker under torchrun stops when its launcher dies

LAUNCHER_PID = None  # torchrun's agent, this worker's parent (None outside torchrun)


def die_with_launcher():
    """Under torchrun, asks the kernel for a SIGTERM when the launcher dies (`kill -9` of torchrun, the OOM killer):
    torchrun starts its workers in sessions of their own, so nothing else stops them, and they would train on as
    orphans. The SIGTERM stops the run after the current step, with a checkpoint (StopSignal). Only under torchrun:
    a plain `python` run under nohup must outlive its shell. Linux only."""
    global LAUNCHER_PID
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    LAUNCHER_PID = os.getppid()  # may be 1: torchrun as a container's first process
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != LAUNCHER_PID:  # it died before prctl took effect: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def launcher_gone():
    return LAUNCHER_PID is not None and os.getppid() != LAUNCHER_PID


if __name__ == "__main__":
    die_with_launcher()

# the heavy imports come after die_with_launcher: importing torch takes seconds
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

try:  # zlib-ng's CRC-32 runs on SIMD instructions, at the speed memory is read; the standard library's may not
    from zlib_ng.zlib_ng import crc32
except ImportError:  # an install without it (requirements.txt lists it): the same checks, slower
    from zlib import crc32

from prepare_dolly import EOT, VOCAB_SIZE, DataError, format_prompt, get_tokenizer

# -----------------------------------------------------------------------------
# config: every knob in one place; the CLI is built from these fields

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
EXIT_ERROR, EXIT_PREEMPTED = 1, 75
MAX_NEW_TOKENS = 256  # the tools' default answer length (chat.py, eval_dolly.py --max_new_tokens)


class UserError(Exception):
    """A problem the user can fix; printed as one line, not a traceback."""


def flag(default, help):
    """A TrainConfig field and its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O
    pretrained_checkpoint: str = flag("logs/model_19072.pt", "build-nanogpt checkpoint, bare state dict, Hub name "
                                      "(gpt2, gpt2-medium, ...) or Hugging Face folder; 'none' = random init")
    data_dir: str = flag("dolly15k", "shards and manifest.json from model/prepare_dolly.py")
    log_dir: str = flag("logs_finetune", "checkpoints, log.txt, metrics.jsonl, samples")
    # resume
    auto_resume: bool = flag(False, "continue from the newest loadable checkpoint in --log_dir")
    resume: bool = flag(False, "resume from --checkpoint_path (or, without it, as --auto_resume)")
    checkpoint_path: str = flag("", "checkpoint to resume from (with --resume)")
    strict_resume: bool = flag(False, "turn every fallback (no checkpoint, no pretrained model) into an error")
    allow_data_change: bool = flag(False, "resume even though the data differs from the checkpoint's")
    # model shape, used only for a random init (a checkpoint brings its own)
    n_layer: int = flag(12, "layers (random init only)")
    n_head: int = flag(12, "attention heads (random init only)")
    n_embd: int = flag(768, "embedding width (random init only)")
    block_size: int = flag(1024, "context length (random init only)")
    vocab_size: int = flag(50304, "vocabulary, >= 50257 (random init only)")
    # data and batch
    batch_size: int = flag(16, "sequences per micro-step per process")
    sequence_length: int = flag(1024, "tokens per sequence, <= block_size")
    total_batch_size: int = flag(524288, "tokens per optimizer step over all processes (gradient accumulation "
                                 "fills the rest)")
    loss_on: str = flag("response", "'response': loss on response tokens only; 'all': every token")
    # optimisation and schedule
    max_lr: float = flag(6e-5, "peak learning rate (1/10 to 1/100 of pretraining's)")
    min_lr: float = flag(6e-6, "learning rate at the end of the cosine decay")
    warmup_steps: int = flag(1, "linear warmup steps")
    max_steps: int = flag(6, "optimizer steps (6 x 524288 tokens is about one epoch of Dolly-15k)")
    num_epochs: float = flag(0.0, "if > 0, sets max_steps from the data size, e.g. 0.3, 0.5, 1")
    weight_decay: float = flag(0.01, "AdamW weight decay on matrices (not biases, LayerNorms)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = off)")
    # evaluation and samples
    eval_interval: int = flag(2, "val loss every N steps (and at step 0 and the end)")
    val_tokens: int = flag(0, "evaluate on the first N val tokens (0 = the whole val split)")
    generate_interval: int = flag(2, "generation samples every N steps (0 = never)")
    generate_max_tokens: int = flag(64, "new tokens per sample")
    temperature: float = flag(0.8, "sampling temperature (0 = greedy)")
    top_k: int = flag(50, "sample from the k most likely tokens (0 = all)")
    # checkpoints
    checkpoint_interval: int = flag(2, "full checkpoint every N steps (and at the end)")
    keep_last_n_checkpoints: int = flag(3, "keep the newest N model_*.pt (model_best.pt is kept apart)")
    # system
    device: str = flag("auto", "auto (cuda > mps > cpu), cpu, cuda, mps")
    dtype: str = flag("auto", "auto (bf16 autocast where supported, else fp32), float32, bfloat16")
    compile: str = flag("auto", "torch.compile: auto (on for CUDA), on, off")
    threads: int = flag(0, "CPU threads for torch (0 = torch's choice; 1 is often fastest on shared 2-core boxes)")
    seed: int = flag(1337, "seed for init and sampling; same seed on CPU = same metrics")
    dist_timeout_min: int = flag(30, "minutes a process waits for the others (long enough for a 1.5B save)")
    fsdp: bool = flag(False, "shard weights, gradients and AdamW state over the processes (FSDP2) instead of a "
                             "copy on each (DDP): for models that do not fit one GPU")
    activation_checkpointing: bool = flag(False, "keep only each block's input and recompute the rest in backward: "
                                                 "far less activation memory for one more forward pass")


# Fields that describe this launch (machine, resume decision), never taken from a checkpoint.
LAUNCH_FIELDS = {"data_dir", "log_dir", "auto_resume", "resume", "checkpoint_path", "strict_resume",
                 "allow_data_change", "device", "dtype", "compile", "threads", "dist_timeout_min",
                 "pretrained_checkpoint", "fsdp", "activation_checkpointing"}
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 on Dolly-15k (see README.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of flag values, e.g. config/quickstart.json; "
                   "flags on the command line win over it")
    for f in dataclasses.fields(TrainConfig):
        if f.type is bool or f.type == "bool":  # --x, and --no-x to turn off what a --config file turned on
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    return p


def read_config_file(path):
    """The flag values of a --config JSON file, {"field": value}; raises UserError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a JSON object of flag values, like {{\"max_steps\": 30}}")
    types = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    for name, value in values.items():
        if name not in types:
            raise UserError(f"--config {path}: unknown setting {name!r}; `--help` lists them (without the --)")
        kind = types[name]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name], ok = float(value), True
        if not ok:
            raise UserError(f"--config {path}: {name} must be {kind.__name__}, got {json.dumps(value)}")
    return values


def parse_args(argv=None):
    """Returns (cfg, given): given names the settings the user gave, on the command line or in a --config file.
    On resume those win over the checkpoint's saved settings; the command line wins over the file."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    config_path = pre.parse_known_args(argv)[0].config
    from_file = read_config_file(config_path) if config_path else {}
    parser.set_defaults(**from_file)
    args = vars(parser.parse_args(argv))
    del args["config"]
    explicit = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            kwargs = {"action": "store_true"} if action.nargs == 0 else {"type": action.type}
            explicit.add_argument(*action.option_strings, dest=action.dest, **kwargs)
    explicit.add_argument("--config")
    on_command_line = set(vars(explicit.parse_known_args(argv)[0])) - {"config"}
    return TrainConfig(**args), set(from_file) | on_command_line


def validate_config(cfg, world_size=1, launch_only=False):
    """Collects every problem with the settings, so the user fixes them in one go. launch_only: only the settings
    of this launch (LAUNCH_FIELDS: a resume takes them from the command line, the rest from the checkpoint)."""
    problems = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    need(cfg.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", cfg.device),
         f"--device must be auto, cpu, cuda or mps, got {cfg.device!r}")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    need(cfg.compile in ("auto", "on", "off"), f"--compile must be auto, on or off, got {cfg.compile!r}")
    need(cfg.threads >= 0, f"--threads must be >= 0, got {cfg.threads}")
    need(cfg.dist_timeout_min >= 1, f"--dist_timeout_min must be >= 1, got {cfg.dist_timeout_min}")
    if not launch_only:
        infinite = [f"--{k} {v}" for k, v in asdict(cfg).items() if isinstance(v, float) and not math.isfinite(v)]
        need(not infinite, f"{', '.join(infinite)}: must be a finite number")
        need(cfg.max_lr > 0, f"--max_lr must be > 0, got {cfg.max_lr}")
        need(0 <= cfg.min_lr <= cfg.max_lr, f"--min_lr must be in [0, max_lr={cfg.max_lr}], got {cfg.min_lr}")
        need(cfg.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {cfg.warmup_steps}")
        need(cfg.max_steps >= 1 or cfg.num_epochs > 0, f"--max_steps must be >= 1, got {cfg.max_steps}")
        need(cfg.num_epochs >= 0, f"--num_epochs must be >= 0, got {cfg.num_epochs}")
        for name in ("batch_size", "total_batch_size", "sequence_length", "eval_interval", "checkpoint_interval"):
            need(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
        for name in ("weight_decay", "grad_clip", "val_tokens", "generate_interval"):
            need(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
        need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1,
             f"--beta1/--beta2 must be in [0, 1), got {cfg.beta1}/{cfg.beta2}")
        need(cfg.loss_on in ("response", "all"), f"--loss_on must be 'response' or 'all', got {cfg.loss_on!r}")
        need(cfg.generate_max_tokens >= 1, f"--generate_max_tokens must be >= 1 (--generate_interval 0 turns "
                                           f"samples off), got {cfg.generate_max_tokens}")
        need(cfg.keep_last_n_checkpoints >= 1, f"--keep_last_n_checkpoints must be >= 1 (the newest is always kept), "
                                               f"got {cfg.keep_last_n_checkpoints}")
        need(cfg.temperature >= 0 and cfg.top_k >= 0,
             f"--temperature and --top_k must be >= 0, got {cfg.temperature}/{cfg.top_k}")
        need(min(cfg.n_layer, cfg.n_embd, cfg.block_size) >= 1,
             f"--n_layer, --n_embd and --block_size must be >= 1, got {cfg.n_layer}, {cfg.n_embd}, {cfg.block_size}")
        need(cfg.vocab_size >= VOCAB_SIZE,
             f"--vocab_size must be >= {VOCAB_SIZE} (GPT-2's tokenizer), got {cfg.vocab_size}")
        need(cfg.n_head >= 1 and cfg.n_embd % max(cfg.n_head, 1) == 0,
             f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
        micro = cfg.batch_size * cfg.sequence_length * world_size
        if micro > 0 and cfg.total_batch_size % micro != 0:
            valid = [b for b in range(1, 129) if cfg.total_batch_size % (b * cfg.sequence_length * world_size) == 0]
            problems.append(f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size x "
                            f"sequence_length x processes = {cfg.batch_size} x {cfg.sequence_length} x {world_size}; "
                            f"with these, valid --batch_size values are "
                            f"{valid or 'none: change --total_batch_size or --sequence_length'}")
    if problems:
        raise UserError("invalid settings:\n  - " + "\n  - ".join(problems))


# -----------------------------------------------------------------------------
# the GPT-2 model (as nanoGPT/build-nanogpt, with Hugging Face's parameter names)

@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # GPT-2's 50,000 merges + 256 bytes + <|endoftext|>; build-nanogpt pads to 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1
        self.n_head = config.n_head

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:  # generation: keys/values of earlier positions are reused, not recomputed
            if kv_cache[0] is not None:
                k, v = torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
            kv_cache[0], kv_cache[1] = k, v
        # a single new query attends to every cached position, so the causal mask is only needed when T > 1;
        # generate_batch passes its own mask (causal, and no attention to the padding of shorter prompts)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)  # pre-LN residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        self.activation_checkpointing = False  # --activation_checkpointing: blocks recomputed in backward

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5  # residual projections, GPT-2 paper
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, reduction="mean"):
        """idx (B, T) token ids. Without targets: returns (logits, None), logits (B, T, vocab). With targets (B, T),
        where IGNORE_INDEX marks positions without loss, or with (positions, targets) as target_positions gives
        them: returns (None, loss); logits are computed only at target positions. (Generation, with its KV cache,
        calls hidden_states itself: see generate.)"""
        if targets is None:
            return self.lm_head(self.hidden_states(idx)), None
        # tied weights (as GPT-2, see __init__): the output layer's weight gradient goes to the embedding's backward
        weight = self.lm_head.weight
        is_tied = weight is self.transformer.wte.weight and weight.requires_grad and torch.is_grad_enabled()
        tied = {} if is_tied else None
        tok_emb = TiedEmbedding.apply(idx, weight, tied) if tied is not None else None
        x = self.hidden_states(idx, tok_emb=tok_emb)  # (B, T, C)
        positions, targets = targets if isinstance(targets, tuple) else target_positions(targets)
        return None, target_cross_entropy(x.flatten(0, 1).index_select(0, positions), weight, targets, reduction, tied)

    def hidden_states(self, idx, kv_cache=None, pos=None, attn_mask=None, tok_emb=None):
        """The transformer without the output layer: (B, T) ids -> (B, T, C) after the final LayerNorm.
        This fixed-shape part is what --compile compiles (see start_run). generate_batch gives each row its own
        positions pos (B, T) and an attention mask; training passes the token embeddings tok_emb (B, T, C), looked
        up outside the compiled part (TiedEmbedding). Generation calls GPT.hidden_states(model, ...), the
        uncompiled one, with kv_cache (a list of [k, v] per layer, from new_kv_cache) that changes at every token."""
        B, T = idx.size()
        if pos is None:
            start = 0 if kv_cache is None or kv_cache[0][0] is None else kv_cache[0][0].size(2)
            assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = (self.transformer.wte(idx) if tok_emb is None else tok_emb) + self.transformer.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # saves x only; backward runs the block again
            else:
                x = block(x, None if kv_cache is None else kv_cache[i], attn_mask)
        return self.transformer.ln_f(x)

    def new_kv_cache(self):
        return [[None, None] for _ in range(self.config.n_layer)]

    def configure_optimizer(self, cfg, device_type):
        # decay the matrices (matmul weights, embeddings); not biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                 **({"fused": True} if fused else {}))

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) from the Hub, or a folder in the Hugging Face
        layout (config.json + model.safetensors, e.g. one model/export_hf.py wrote)."""
        from safetensors.torch import load_file
        config_path, weights_path = hub_files(name_or_dir)
        with open(config_path) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"])
        sd = {}
        for k, v in load_file(weights_path).items():
            k = k.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # HF's causal-mask buffers
            if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                v = v.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            sd[k if k.startswith("lm_head") else f"transformer.{k}"] = v
        model = empty_gpt(config)
        load_state_dict_checked(model, sd, name_or_dir)
        return model


HUB_FILES = ("config.json", "model.safetensors")


def empty_gpt(config, device="cpu"):
    """A GPT with room for its weights but no random init (which takes seconds at 124M), for weights about to be
    loaded: every tensor is then filled by load_state_dict_checked. On the meta device it holds no memory at all,
    for load_state_dict_checked(..., assign=True)."""
    with torch.device("meta"):
        model = GPT(config)
    if device == "meta":
        return model
    model.to_empty(device=device)
    model.transformer.wte.weight = model.lm_head.weight  # to_empty makes a new tensor per module: tie them again
    return model


def hub_files(name_or_dir):
    """(config.json, model.safetensors) paths of a Hugging Face folder, or of a Hub model: the local Hub cache
    first, so an offline node with a cached copy needs no network."""
    if os.path.isdir(name_or_dir):
        paths = tuple(os.path.join(name_or_dir, f) for f in HUB_FILES)
        if not all(os.path.isfile(p) for p in paths):
            raise UserError(f"{name_or_dir}: expected config.json and model.safetensors (the Hugging Face layout)")
        return paths
    from huggingface_hub import hf_hub_download
    from prepare_dolly import hub_reachable
    try:
        return tuple(hf_hub_download(name_or_dir, f, local_files_only=True) for f in HUB_FILES)
    except Exception:
        pass
    try:
        if not hub_reachable():
            raise ConnectionError("huggingface.co is unreachable")
        return tuple(hf_hub_download(name_or_dir, f) for f in HUB_FILES)
    except Exception as e:
        raise UserError(f"cannot fetch {name_or_dir} from the Hugging Face Hub ({type(e).__name__}); on an offline "
                        f"machine, download it elsewhere (hf download {name_or_dir} config.json model.safetensors "
                        f"--local-dir DIR) and pass DIR") from None


# -----------------------------------------------------------------------------
# the loss: cross-entropy at the target positions only, in chunks, with the tied weight's one gradient buffer

IGNORE_INDEX = -100  # targets that carry no loss (prompt tokens with --loss_on response)


class TargetCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ weight.T) against targets, computed in row chunks so the (N, vocab) logits
    never exist at once. Gradients are formed in the forward pass, chunk by chunk (d loss / d logits = softmax -
    onehot), so backward costs nothing and nothing large is saved. With `tied` (a dict shared with this forward
    pass's TiedEmbedding), the weight's gradient goes there instead."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, tied=None):
        ctx.tied = tied
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = None  # the first chunk's product becomes it: no zero-filled (vocab, C) buffer to add into
        rows = torch.arange(chunk_rows, device=h.device)
        buffer = logits_buffer(h, weight, chunk_rows)
        for s in range(0, h.size(0), chunk_rows):
            hc, tc = h[s:s + chunk_rows], targets[s:s + chunk_rows]
            logits = chunk_logits(buffer, hc, weight)  # (n, V) fp32
            picked = logits.gather(1, tc[:, None])
            maxes = logits.amax(dim=-1, keepdim=True)
            dlogits = logits.sub_(maxes).exp_()  # exp(logits - max), in place: one exp per logit
            sumexp = dlogits.sum(dim=-1, keepdim=True)
            loss += (sumexp.log() + maxes - picked).sum()  # logsumexp - target logit
            dlogits.div_(sumexp)  # softmax
            dlogits[rows[:hc.size(0)], tc] -= 1
            dlogits = dlogits.to(h.dtype)
            grad_h[s:s + chunk_rows] = dlogits @ weight
            if grad_w is None:
                grad_w = (dlogits.t() @ hc).to(weight.dtype)
            elif hc.dtype == grad_w.dtype:
                grad_w.addmm_(dlogits.t(), hc)  # in place: no second (vocab, C) buffer per chunk
            else:  # autocast: bf16 product, fp32 sum
                grad_w.add_(dlogits.t() @ hc)
        ctx.save_for_backward(grad_h, torch.zeros_like(weight) if grad_w is None else grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # in place: grad_w is as large as the embedding and used once (a second backward through a retained graph
        # raises)
        grad_w = grad_w.mul_(grad_loss)
        tied, ctx.tied = ctx.tied, None
        if tied is not None and ctx.needs_input_grad[1]:
            # handed to the tied embedding's backward, which runs later (it needs grad_h first), adds its part and
            # returns the sum as the weight's one gradient
            tied["grad_w"], grad_w = grad_w, None
        return grad_h * grad_loss, grad_w, None, None, None


class TiedEmbedding(torch.autograd.Function):
    """Token embedding lookup in the output layer's (tied) weight. Autograd would sum the weight's two gradients,
    the output layer's and this lookup's, each a (vocab, C) buffer; here the lookup adds its rows in place into the
    output layer's gradient, handed over in `tied` by TargetCrossEntropy's backward (which runs first), and returns
    the sum: one (vocab, C) buffer less at the end of backward, and no full-size add."""

    @staticmethod
    def forward(ctx, idx, weight, tied):
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        idx, = ctx.saved_tensors
        grad_w = ctx.tied.pop("grad_w", None)
        if grad_w is None:  # the output layer's gradient did not come this way
            grad_w = grad_out.new_zeros(ctx.weight_shape)
        idx, rows = idx.reshape(-1), grad_out.reshape(-1, grad_out.size(-1)).to(grad_w.dtype)
        # a deterministic scatter-add, as nn.Embedding's backward: on CUDA index_put_ sorts (index_add_ uses
        # atomics), on a CPU index_add_ (index_put_ uses atomics with several threads)
        if grad_w.is_cuda:
            grad_w.index_put_((idx,), rows, accumulate=True)
        else:
            grad_w.index_add_(0, idx, rows)
        return None, grad_w, None


def target_positions(y):
    """(positions, targets) of the (B, T) targets y: the flat indices b * T + t that have a target, and those
    targets. Done on the host before y goes to a GPU: how many positions there are decides the loss's shapes, so
    finding them on the GPU (a boolean mask) would make the CPU wait there for the device at every micro-step."""
    y = y.reshape(-1)
    positions = torch.nonzero(y != IGNORE_INDEX).squeeze(1)
    return positions, y[positions]


def logits_buffer(h, weight, chunk_rows):
    """One fp32 (chunk rows, vocab) buffer that every chunk's logits are written into. On a CPU a fresh tensor of
    this size per chunk is fresh memory from the OS each time (too large for malloc to keep), and its page faults
    slow the output layer's matmul. (Under autocast the bf16 product is still a new tensor per chunk; on a GPU
    the caching allocator reuses memory anyway.)"""
    return torch.empty(min(chunk_rows, h.size(0)), weight.size(0), dtype=torch.float32, device=h.device)


def chunk_logits(buffer, hc, weight):
    """hc @ weight.T, as fp32, in the first len(hc) rows of buffer."""
    out = buffer[:hc.size(0)]
    if torch.is_autocast_enabled(hc.device.type) or hc.dtype != torch.float32 or weight.dtype != torch.float32:
        return out.copy_(hc @ weight.t())  # autocast skips out= ops: the product in its dtype, then into the buffer
    return torch.mm(hc, weight.t(), out=out)


def row_losses(logits, targets):
    """Cross-entropy of each row of logits (n, V), which it overwrites: logsumexp - the target's logit, with one
    exp per logit and no second (n, V) buffer (F.cross_entropy makes both a log-softmax and its exp)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    maxes = logits.amax(dim=-1)
    sumexp = logits.sub_(maxes[:, None]).exp_().sum(dim=-1)
    return sumexp.log_() + maxes - picked


def target_cross_entropy(h, weight, targets, reduction="mean", tied=None):
    """Cross-entropy at the positions that have a target: h (N, C), targets (N,).
    reduction: 'mean', 'sum', or 'none' (one loss per row, no gradient).
    tied: the dict given to TiedEmbedding when weight is also the token embedding, or None."""
    # 64 MB of fp32 logits per chunk on a CPU (each chunk reads the whole (vocab, C) weight, so much smaller chunks
    # are slower); 512 MB on a GPU, where small matmuls waste the device
    chunk_rows = max(1, (2 ** 27 if h.is_cuda else 2 ** 24) // weight.size(0))
    if reduction != "none" and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        loss = TargetCrossEntropy.apply(h, weight, targets, chunk_rows, tied)
    else:
        with torch.no_grad():
            buffer = logits_buffer(h, weight, chunk_rows)
            chunks = [row_losses(chunk_logits(buffer, h[s:s + chunk_rows], weight), targets[s:s + chunk_rows])
                      for s in range(0, h.size(0), chunk_rows)]
            losses = torch.cat(chunks) if chunks else h.new_zeros(0, dtype=torch.float32)
        if reduction == "none":
            return losses
        loss = losses.sum()
    return loss / max(1, targets.numel()) if reduction == "mean" else loss


# -----------------------------------------------------------------------------
# loading weights: pretrained models, build-nanogpt checkpoints; files that could run code or are damaged refused

class _NanoGPTConfig:
    """Stand-in for build-nanogpt's GPTConfig, which its train_gpt2.py pickles as __main__.GPTConfig.
    Allow-listing this one class lets torch.load(weights_only=True) read such files without running pickled code."""


_NanoGPTConfig.__module__, _NanoGPTConfig.__qualname__, _NanoGPTConfig.__name__ = "__main__", "GPTConfig", "GPTConfig"


def safe_torch_load(path, map_location="cpu", mmap=False):
    """torch.load that never executes arbitrary pickled code and checks every byte of the file against the CRC-32s
    of its zip archive, in threads while torch.load reads it. Raises UserError for unsafe or damaged files.
    mmap: map the file instead of reading it, so that its tensors are read where they are used (--fsdp ranks share
    the pages and copy their shards only; the tools take the weights only); the check then costs its own time."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head and head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (legacy format: a pickle)
        raise UserError(f"{path}: not a PyTorch checkpoint file (torch.save writes a zip archive)")
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(damaged_records, path) if head == b"PK" else None
        try:
            with torch.serialization.safe_globals([_NanoGPTConfig]):
                loaded = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and head == b"PK")
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
            detail = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line][:1]
            raise UserError(f"refusing to load {path}: it holds Python objects other than tensors and plain data "
                            f"({detail[0][:200] if detail else 'unsafe pickle'}); only load files you trust") from None
        damaged = check.result() if check else []
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise UserError(f"{path}: damaged: record {damaged[0]}{more} does not match the CRC-32 stored with it (the "
                        f"file changed on disk or in a copy)")
    return loaded


def damaged_records(path):
    """The names of the records of a zip archive (what torch.save writes) whose bytes do not match the CRC-32 the
    archive keeps for each (torch.load never checks them). The file is mapped, not read, and records are checked in
    parallel: crc32 releases the GIL."""
    with zipfile.ZipFile(path) as archive:
        records = sorted(archive.infolist(), key=lambda info: -info.compress_size)
    with open(path, "rb") as file, map_file(file.fileno(), 0, access=ACCESS_READ) as mapped:
        data = memoryview(mapped)

        def damaged(info):
            if info.compress_type != zipfile.ZIP_STORED:  # torch.save stores records uncompressed; others: zipfile
                with zipfile.ZipFile(path) as archive, archive.open(info) as f:
                    try:
                        while f.read(2 ** 24):
                            pass
                    except zipfile.BadZipFile:
                        return True
                return False
            header = bytes(data[info.header_offset:info.header_offset + 30])  # local file header: name, extra follow
            if len(header) < 30:
                return True
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            with data[start:start + info.compress_size] as record:
                return len(record) != info.compress_size or crc32(record) != info.CRC

        try:
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                return [info.filename for info, bad in zip(records, pool.map(damaged, records)) if bad]
        finally:
            data.release()


def strip_wrapper_prefixes(sd):
    """A state dict without DDP's `module.` and torch.compile's `_orig_mod.` key prefixes."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in sd.items()}


def load_state_dict_checked(model, sd, source, assign=False):
    """Loads sd into model after checking every key and shape; names each mismatch. assign: the model takes sd's
    tensors themselves instead of copies (into an empty_gpt(config, "meta"))."""
    sd = strip_wrapper_prefixes(sd)
    sd = {k: v for k, v in sd.items() if not k.endswith(".attn.bias")}  # nanoGPT's causal-mask buffer
    if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {missing[:8]}"] if missing else []) + \
                ([f"unexpected keys {unexpected[:8]}"] if unexpected else []) + shapes[:8]
        raise UserError(f"{source} does not fit the GPT-2 model: " + "; ".join(parts))
    if assign:  # the model's weights are float32, as a copy into them would make them
        sd = {k: v if v.dtype == torch.float32 else v.float() for k, v in sd.items()}
    model.load_state_dict(sd, assign=assign)
    if assign:
        model.transformer.wte.weight = model.lm_head.weight  # tied again, as in GPT.__init__


def is_hub_source(src):
    """A Hub model name or a folder in the Hugging Face layout."""
    return src in HUB_MODELS or (os.path.isdir(src) and os.path.isfile(os.path.join(src, "config.json")))


def load_pretrained(cfg, mapped=False):
    """Returns (model, init source). The guide's order after fine-tune checkpoints: pretrained file -> random init.
    mapped: a checkpoint file's weights stay in the mapped file (see model_from_checkpoint)."""
    src = cfg.pretrained_checkpoint
    if is_hub_source(src):
        return GPT.from_pretrained(src), f"hub:{src}"
    if src.lower() not in ("", "none") and os.path.isfile(src):
        try:
            ckpt = safe_torch_load(src, mmap=mapped)
        except UserError:
            raise
        except Exception as e:
            ckpt, reason = None, f"cannot read it ({type(e).__name__}: {str(e)[:120]})"
        if ckpt is not None:
            if not isinstance(ckpt, dict):
                raise UserError(f"{src}: expected a checkpoint dict or state dict, got {type(ckpt).__name__}")
            sd = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
            model = empty_gpt(model_config_from_checkpoint(ckpt, sd, src), "meta" if mapped else "cpu")
            load_state_dict_checked(model, sd, src, assign=mapped)
            step = f", pretrained step {ckpt['step']}" if isinstance(ckpt.get("step"), int) else ""
            return model, f"pretrained:{src}{step}"
    else:
        reason = "no such file" if src.lower() not in ("", "none") else "--pretrained_checkpoint none"
    if cfg.strict_resume and src.lower() not in ("", "none"):
        raise UserError(f"--pretrained_checkpoint {src}: {reason} (--strict_resume forbids falling back to a random "
                        f"init)")
    config = GPTConfig(**{k: getattr(cfg, k) for k in SHAPE_FIELDS})
    if src.lower() not in ("", "none"):
        print0("!" * 100 + f"\nWARNING: pretrained checkpoint {src}: {reason}. Starting from a RANDOM INIT "
               f"({config.n_layer} layers, {config.n_embd} wide): fine-tuning will not give a useful model.\n"
               f"Pass --pretrained_checkpoint PATH (build-nanogpt's logs/model_19072.pt) or --pretrained_checkpoint "
               f"gpt2.\n" + "!" * 100)
    return GPT(config), "random"


def model_config_from_checkpoint(ckpt, sd, source):
    """The model shape from a checkpoint's config (build-nanogpt's dataclass, our dict) or from the tensors."""
    saved = ckpt.get("model_config") or ckpt.get("config")
    if isinstance(saved, _NanoGPTConfig):
        saved = vars(saved)
    if isinstance(saved, dict) and all(k in saved for k in SHAPE_FIELDS):
        return GPTConfig(**{k: int(saved[k]) for k in SHAPE_FIELDS})
    sd = strip_wrapper_prefixes(sd)
    try:  # a bare state dict: read the shape off the tensors; GPT-2's heads are 64 wide
        vocab, n_embd = sd["transformer.wte.weight"].shape
        n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k)))
        return GPTConfig(block_size=sd["transformer.wpe.weight"].shape[0], vocab_size=vocab, n_layer=n_layer,
                         n_head=max(1, n_embd // 64), n_embd=n_embd)
    except (KeyError, ValueError) as e:
        raise UserError(f"{source}: not a GPT-2 state dict (no {e})") from None


# -----------------------------------------------------------------------------
# data: a cyclic token stream over the shards, and the per-step batches

MANIFEST_KEYS = ("source", "source_sha256", "val_fraction", "seed", "template", "categories", "splits")
SHARD_KEYS = {"tokens", "mask", "category", "num_tokens"}


def load_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise UserError(f"no prepared data in {data_dir}/ (manifest.json missing); run `python model/prepare_dolly.py` "
                        f"first")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, or not JSON (a half-copied file)
        raise UserError(f"{path}: unreadable ({type(e).__name__}); re-run `python model/prepare_dolly.py`") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1 or manifest.get("tokenizer") != "gpt2" \
            or manifest.get("vocab_size") != VOCAB_SIZE:
        raise UserError(f"{path}: made by another version or tokenizer; re-run `python model/prepare_dolly.py`")
    if problem := manifest_problem(manifest):
        raise UserError(f"{path}: incomplete or damaged ({problem}); re-run `python model/prepare_dolly.py`")
    if manifest["splits"]["train"]["tokens"] == 0:
        raise UserError(f"{data_dir}/: the train split is empty; re-run `python model/prepare_dolly.py`")
    if any("sha256" not in sh for split in manifest["splits"].values() for sh in split["shards"]):
        print0(f"note: {path} has no shard checksums (an older prepare_dolly.py made it), so damaged shards are "
               f"found only by their size and token ids; re-run `python model/prepare_dolly.py` to add them")
    return manifest


def manifest_problem(manifest):
    """What the trainer reads but manifest.json lacks, or None."""
    if missing := [k for k in MANIFEST_KEYS if k not in manifest]:
        return f"no {', '.join(missing)}"
    for name in ("train", "val"):
        split = manifest["splits"].get(name) if isinstance(manifest["splits"], dict) else None
        if not (isinstance(split, dict) and isinstance(split.get("tokens"), int)
                and isinstance(split.get("tokens_per_category"), dict)):
            return f"no complete {name} split"
        shards = split.get("shards")
        if not (isinstance(shards, list) and all(isinstance(sh, dict) and SHARD_KEYS <= sh.keys() for sh in shards)):
            return f"a {name} shard entry is incomplete"
    return None


def data_fingerprint(manifest):
    """What a checkpoint remembers of its data: the source records, the split and the tokenization."""
    keys = ("source_sha256", "val_fraction", "seed", "template", "tokenizer")
    parts = [manifest[k] for k in keys] + [manifest["splits"][s]["tokens"] for s in ("train", "val")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_shard(path):
    """A memory-mapped .npy shard, or a UserError naming the file if it is missing or damaged."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        reason = None if isinstance(array, np.ndarray) and array.ndim == 1 else "not a 1-D array"  # e.g. an .npz
    except (OSError, ValueError, EOFError) as e:  # missing, empty, truncated (header or data) or not an .npy file
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "truncated or not a NumPy .npy file"
    if reason:
        raise UserError(f"{path}: {reason}; re-run `python model/prepare_dolly.py`")
    return array


def check_shard(path, array, sha256=None, vocab_size=None):
    """Raises UserError naming the file if its bytes differ from the sha256 prepare_dolly.py recorded, or (tokens)
    if it holds an id outside the vocabulary, which would crash the embedding lookup mid-run."""
    if sha256 is not None:
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                raise UserError(f"{path}: damaged (its sha256 does not match manifest.json); re-run "
                                f"`python model/prepare_dolly.py`")
    if vocab_size is not None and len(array) and int(array.max()) >= vocab_size:
        position = int(np.argmax(array >= vocab_size))
        raise UserError(f"{path}: token id {int(array[position])} at position {position} is not below the vocabulary "
                        f"size {vocab_size}; re-run `python model/prepare_dolly.py`")


class TokenStream:
    """The tokens of one split as one endless stream (epoch after epoch), read from memory-mapped shards.
    Each example ends with <|endoftext|>, so wrapping from the last example to the first is a clean boundary.
    The shards are checked at start-up (sizes, checksums, token ids): damage is reported before any step."""

    def __init__(self, data_dir, split, manifest):
        shards = manifest["splits"][split]["shards"]
        self.parts = []
        for s in shards:
            paths = [os.path.join(data_dir, s[kind]) for kind in ("tokens", "mask", "category")]
            arrays = [load_shard(path) for path in paths]
            if not (len(arrays[0]) == len(arrays[1]) == len(arrays[2]) == s["num_tokens"]) \
                    or arrays[0].dtype != np.uint16:
                raise UserError(f"{data_dir}/{s['tokens']}: shard does not match manifest.json; re-run "
                                f"`python model/prepare_dolly.py`")
            for kind, path, array in zip(("tokens", "mask", "category"), paths, arrays):
                vocab_size = manifest["vocab_size"] if kind == "tokens" else None
                check_shard(path, array, s.get("sha256", {}).get(kind), vocab_size)
            self.parts.append(arrays)
        self.starts = np.cumsum([0] + [s["num_tokens"] for s in shards])
        self.num_tokens = int(self.starts[-1])

    def read(self, start, n, kinds=(0, 1, 2)):
        """Tokens, masks and categories (kinds 0, 1, 2) at stream positions start .. start+n-1 (wrapping around)."""
        pieces, pos = [], start % self.num_tokens
        while n > 0:
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            lo = pos - self.starts[k]
            take = min(n, int(self.starts[k + 1] - pos))
            pieces.append([self.parts[k][i][lo:lo + take] for i in kinds])
            n -= take
            pos = (pos + take) % self.num_tokens
        return [np.concatenate([p[j] for p in pieces]) for j in range(len(kinds))]


def make_targets(tokens, mask, loss_on):
    y = torch.from_numpy(tokens.astype(np.int64))
    if loss_on == "response":
        y[torch.from_numpy(mask == 0)] = IGNORE_INDEX
    return y


class DataLoader:
    """Each optimizer step takes the next total_batch_size tokens of the train stream. They are cut into
    world_size x grad_accum micro-batches of (B, T); rank r takes micro-batches r, r + world_size, ...
    The state is one number, the stream position, so a resumed run (with any number of processes, same total
    batch) continues on exactly the next tokens, and no batch is replayed to get there."""

    def __init__(self, stream, B, T, grad_accum, rank, world_size, loss_on):
        self.stream, self.B, self.T, self.grad_accum = stream, B, T, grad_accum
        self.rank, self.world_size, self.loss_on = rank, world_size, loss_on
        self.tokens_per_step = B * T * grad_accum * world_size
        self.position = 0

    def next_step(self):
        """This rank's micro-batches [(x, y), ...] and the number of target tokens in the whole step (all ranks)."""
        B, T = self.B, self.T
        batches = []
        for micro_step in range(self.grad_accum):
            start = self.position + (micro_step * self.world_size + self.rank) * B * T
            tokens, mask = self.stream.read(start, B * T + 1, kinds=(0, 1))
            x = torch.from_numpy(tokens[:-1].astype(np.int64)).view(B, T)
            y = make_targets(tokens[1:], mask[1:], self.loss_on).view(B, T)
            batches.append((x, y))
        # every rank can count the step's targets itself: the targets of all micro-batches are one contiguous range
        if self.loss_on == "response":
            (mask,) = self.stream.read(self.position + 1, self.tokens_per_step, kinds=(1,))
            num_targets = int(np.count_nonzero(mask))
        else:
            num_targets = self.tokens_per_step
        self.position += self.tokens_per_step
        return batches, num_targets

    def state_dict(self):
        return {"position": self.position, "tokens_per_step": self.tokens_per_step,
                "stream_tokens": self.stream.num_tokens}

    def load_state_dict(self, state, allow_data_change=False):
        if state["stream_tokens"] != self.stream.num_tokens and not allow_data_change:
            raise UserError(f"the checkpoint's train data had {state['stream_tokens']} tokens, the shards now have "
                            f"{self.stream.num_tokens}; re-run prepare_dolly.py as before, or pass --allow_data_change")
        self.position = int(state["position"])  # with other data: continue at the same point of the epoch count


def val_batches(stream, B, T, max_tokens, loss_on, rank, world_size, lockstep=False):
    """The val split (or its first max_tokens) as non-overlapping (B, T) batches, each target used exactly once;
    the last sequence is padded with IGNORE_INDEX targets. Batch i goes to rank i % world_size. lockstep: every
    rank gets as many batches (some without targets), for --fsdp, where each forward is a collective."""
    n_pred = stream.num_tokens - 1 if max_tokens <= 0 else min(max_tokens, stream.num_tokens - 1)
    tokens, mask, cats = stream.read(0, n_pred + 1)
    x_all = np.zeros(math.ceil(n_pred / T) * T, dtype=np.int64)
    x_all[:n_pred] = tokens[:n_pred]
    y_all = torch.full((len(x_all),), IGNORE_INDEX, dtype=torch.long)
    y_all[:n_pred] = make_targets(tokens[1:], mask[1:], loss_on)
    c_all = torch.zeros(len(x_all), dtype=torch.long)
    c_all[:n_pred] = torch.from_numpy(cats[1:].astype(np.int64))
    x_all = torch.from_numpy(x_all).view(-1, T)
    y_all, c_all = y_all.view(-1, T), c_all.view(-1, T)
    starts = range(0, x_all.size(0), B)
    for i, s in enumerate(starts):
        if i % world_size == rank:
            yield x_all[s:s + B], y_all[s:s + B], c_all[s:s + B]
    if lockstep and rank >= len(starts) % world_size > 0:
        yield x_all[:1], torch.full_like(y_all[:1], IGNORE_INDEX), c_all[:1]


# -----------------------------------------------------------------------------
# optimisation: the learning-rate schedule and one step's gradients

def get_lr(step, cfg):
    """LR of optimizer step `step` (0-based): linear warmup, cosine decay to min_lr, then flat. Positive at step 0:
    warmup counts from 1/warmup_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    decay_ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


def accumulate_gradients(train_model, batches, num_targets, world_size, device, autocast=nullcontext()):
    """Forward and backward over this rank's micro-batches of one optimizer step. Returns the summed loss
    (detached). The loss is normalised by the whole step's target count (all micro-steps, all ranks), so the
    gradient equals one big batch's whatever the masking; x world_size undoes the averaging over ranks of DDP's
    all-reduce and FSDP's reduce-scatter."""
    loss_sum = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(batches):
        positions, targets = target_positions(y)  # on the host: no wait for the GPU in the step
        if str(device).startswith("cuda"):  # pinned host memory lets the copy overlap with compute
            x, positions, targets = (t.pin_memory().to(device, non_blocking=True) for t in (x, positions, targets))
        last = micro_step == len(batches) - 1
        # DDP all-reduces gradients only on the last micro-step. FSDP reduce-scatters them at every one: held back,
        # they would pile up whole on every rank, the memory --fsdp is there to save.
        hold_back = world_size > 1 and not last and hasattr(train_model, "no_sync")
        with train_model.no_sync() if hold_back else nullcontext():
            with autocast:
                _, loss = train_model(x, (positions, targets), reduction="sum")
            (loss * (world_size / max(1, num_targets))).backward()
        loss_sum += loss.detach()
    return loss_sum


# -----------------------------------------------------------------------------
# checkpoints and atomic writes

CHECKPOINT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")
BEST_NAME = "model_best.pt"
REQUIRED_KEYS = ("format_version", "model", "model_config", "optimizer", "step", "train_loader_state", "config",
                 "data_fingerprint")
TEMP_RE = re.compile(r"\.tmp\d+$")  # the temp names atomic_replace makes (and a killed write leaves behind)


@contextmanager
def atomic_replace(path):
    """Yields a temp path in path's folder for the body to write (and fsync); then renames it to path and fsyncs
    the folder: a crash leaves the old file or the new one, never half of one. On an error the temp file goes.
    Every file the trainer writes goes through here."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


def fsync_path(path):
    """fsync of a file or a folder by its name (a folder's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path):
    with atomic_replace(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path, text):
    with atomic_replace(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_link(src, path):
    """Makes path a second name of the file src, replacing path atomically: a hard link, which costs no time and
    no disk (a copy where the file system has no hard links). model_best.pt on a checkpoint step is written so."""
    with atomic_replace(path) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def remove_temp_files(folder):
    """Deletes what killed atomic writes left in folder (names ending in .tmpPID)."""
    for name in os.listdir(folder):
        if TEMP_RE.search(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def checkpoint_name(step):
    return f"model_{step:05d}.pt"


def list_checkpoints(log_dir):
    """[(step, path)] of the model_NNNNN.pt files in log_dir, oldest first (numeric order: 10 after 9)."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), os.path.join(log_dir, name))
             for name in os.listdir(log_dir) if (m := CHECKPOINT_RE.match(name))]
    return sorted(found)


def prune_checkpoints(log_dir, keep):
    """Deletes all but the newest `keep` model_NNNNN.pt files; model_best.pt and other files are never touched."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest checkpoint is always kept), got {keep}")
    for _, path in list_checkpoints(log_dir)[:-keep]:
        os.remove(path)


def checkpoint_state(model, optimizer, loader, cfg, step, *, val_loss=None, best_val_loss=float("inf"),
                     prev_train_loss=None, init_source="random", init_seed=None, fingerprint="", world_size=1):
    """The full training state that a checkpoint holds: tensors and plain values only, so that
    torch.load(weights_only=True) reads it. The same for every strategy: under --fsdp the shards are gathered to
    rank 0 (every rank must call this then; the others get None)."""
    model_state, optimizer_state = full_training_state(model, optimizer)
    if model_state is None:
        return None
    return {"format_version": CHECKPOINT_VERSION, "model": model_state, "model_config": asdict(model.config),
            "optimizer": optimizer_state, "step": step, "val_loss": val_loss, "best_val_loss": best_val_loss,
            "prev_train_loss": prev_train_loss, "train_loader_state": loader.state_dict(), "rng": capture_rng_state(),
            "config": asdict(cfg), "init_source": init_source, "data_fingerprint": fingerprint,
            "init_seed": cfg.seed if init_seed is None else init_seed, "world_size": world_size}


def load_checkpoint(path, mmap=False):
    """Loads and checks a fine-tune checkpoint (mmap: see safe_torch_load); raises UserError saying why it is
    unusable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path}: empty file (0 bytes)")
    try:
        ckpt = safe_torch_load(path, mmap=mmap)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"checkpoint {path}: unreadable, probably truncated ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path}: not a full fine-tune checkpoint (missing {', '.join(missing)})")
    if ckpt["format_version"] != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path}: format version {ckpt['format_version']}, this script reads "
                        f"{CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt, path, mapped=False):
    """The GPT of a fine-tune checkpoint that load_checkpoint accepted. mapped: its weights are the checkpoint's
    tensors, not copies (with load_checkpoint(..., mmap=True): read from the file where they are used)."""
    model = empty_gpt(GPTConfig(**ckpt["model_config"]), "meta" if mapped else "cpu")
    load_state_dict_checked(model, ckpt["model"], path, assign=mapped)
    return model


def find_resume_checkpoint(log_dir, mmap=False):
    """The newest loadable checkpoint in log_dir as (path, ckpt), skipping broken ones with a warning;
    (None, None) if none loads."""
    for _, path in reversed(list_checkpoints(log_dir)):
        try:
            return path, load_checkpoint(path, mmap)
        except UserError as e:
            print0(f"WARNING: skipping {e}")
    return None, None


def count_nonfinite(model):
    """How many of model's float weights (parameters and buffers) hold a NaN/inf: a diverged run. Under --fsdp,
    of this rank's shards. A sum is NaN/inf if any element is: the sums screen every tensor with one host sync
    (cheaper than isfinite() on every element), then isfinite() rules out finite values whose sum overflowed."""
    tensors = [local(t).detach() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    if not tensors:
        return 0
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    suspects = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
    return sum(1 for i in suspects if not torch.isfinite(tensors[i]).all())


def capture_rng_state():
    """RNG states as tensors and plain values, so torch.load(weights_only=True) can read them back."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# one model for the tools (chat, export, eval): what a path means, and the model a run started from

def pick_checkpoint(log_dir):
    """The checkpoint of a run's log dir that the tools use, as (path, ckpt): model_best.pt (the lowest val loss,
    the guide's pick against overfitting) when it loads, else the newest loadable model_NNNNN.pt.
    Raises UserError when none loads."""
    best = os.path.join(log_dir, BEST_NAME)
    if os.path.isfile(best):
        try:
            return best, load_checkpoint(best, mmap=True)
        except UserError as e:
            print0(f"WARNING: skipping {e}")
    path, ckpt = find_resume_checkpoint(log_dir, mmap=True)
    if ckpt is not None:
        return path, ckpt
    if os.path.isfile(best) or list_checkpoints(log_dir):
        raise UserError(f"none of the checkpoints in {log_dir}/ loads (see the warnings above); pass a checkpoint file")
    raise UserError(f"no checkpoint in {log_dir}/ (no model_best.pt or model_NNNNN.pt); fine-tune first with "
                    f"`python model/finetune_dolly.py --log_dir {log_dir}`, or pass a checkpoint file")


@dataclass
class LoadedModel:
    model: GPT  # on the CPU, in eval mode
    description: str  # for the user: what was loaded
    path: str  # the file or Hub source it came from
    checkpoint: dict | None = None  # a fine-tune checkpoint's metadata (no weights or optimizer state), else None


def load_model(spec, mapped=False):
    """Any model the tools accept: a fine-tune checkpoint; a fine-tune log dir (pick_checkpoint); a build-nanogpt
    checkpoint or bare state dict; a Hub name (gpt2, ...) or a Hugging Face folder. Raises UserError saying what is
    wrong with it (NaN/inf weights included). mapped: the weights of a checkpoint file stay in the mapped file
    (model_from_checkpoint), for a tool that reads them once."""
    if os.path.isdir(spec) and not is_hub_source(spec):
        path, ckpt = pick_checkpoint(spec)
        return loaded_finetune(path, ckpt, mapped)
    if not is_hub_source(spec):
        if not os.path.isfile(spec):
            raise UserError(f"{spec}: no such file; pass a fine-tune checkpoint "
                            f"(logs_finetune/model_best.pt), its log dir, a build-nanogpt checkpoint "
                            f"(logs/model_19072.pt), a Hugging Face folder or a Hub name ({', '.join(HUB_MODELS)})")
        try:
            return loaded_finetune(spec, load_checkpoint(spec, mmap=True), mapped)
        except UserError as e:
            if "not a full fine-tune checkpoint" not in str(e):
                raise  # empty, truncated, unsafe or from another format version: the message says which
    # build-nanogpt's checkpoint, a state dict, a Hub model: the trainer's pretrained loader (strict: no random init)
    model, source = load_pretrained(TrainConfig(pretrained_checkpoint=spec, strict_resume=True), mapped)
    check_finite(model, spec)
    return LoadedModel(model.eval(), source, spec)


def loaded_finetune(path, ckpt, mapped=False):
    model = model_from_checkpoint(ckpt, path, mapped)
    check_finite(model, path)
    val = f", val loss {ckpt['val_loss']:.4f}" if isinstance(ckpt.get("val_loss"), float) else ""
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
    return LoadedModel(model.eval(), f"{path} (fine-tuned, step {ckpt['step']}{val}, from "
                                     f"{ckpt.get('init_source', '?')})", path, meta)


def run_tool(body):
    """A tool's main (chat, eval, export): body() returns the exit status; a UserError (or prepare_dolly's DataError)
    becomes one `error:` line on stderr and exit 1, Ctrl-C exit 130."""
    try:
        return body()
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def check_finite(model, name):
    """Raises UserError if a weight of model is NaN/inf: a diverged run, whose answers would be nonsense."""
    if bad := count_nonfinite(model):
        raise UserError(f"{name} holds NaN/inf weights (in {bad} tensor{'s' * (bad > 1)}; the run diverged); "
                        f"use an earlier checkpoint")


def start_model(ckpt, path):
    """The model the run of a fine-tune checkpoint started from: its pretrained model loaded again, or its random
    init rebuilt from the checkpoint's shape and seed (the same weights: see start_run). Returns (model, source)."""
    source, config = ckpt.get("init_source", "?"), GPTConfig(**ckpt["model_config"])
    if source == "random":
        seed = ckpt.get("init_seed", ckpt["config"]["seed"])
        torch.manual_seed(seed)
        return GPT(config).eval(), f"random init (seed {seed}) of {path}"
    kind, _, src = source.partition(":")
    src = src.split(", pretrained step")[0]
    if kind not in ("hub", "pretrained") or not src:
        raise UserError(f"{path}: does not say which model its run started from (init_source {source!r})")
    if kind == "pretrained" and not os.path.isfile(src):
        raise UserError(f"{path} started from {src}, which is not here any more; pass that file itself")
    model, _ = load_pretrained(TrainConfig(pretrained_checkpoint=src, strict_resume=True))
    if model.config != config:
        raise UserError(f"{src} is not the shape {path} was fine-tuned from ({model.config} vs {config})")
    return model.eval(), f"{source} (the start of {path})"


# -----------------------------------------------------------------------------
# devices, distributed set-up, logging, the run lock, stop signals

def pick_device(name):
    """'auto' -> cuda > mps > cpu; an explicit device that torch cannot use is a UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but torch sees no CUDA GPU; use --device cpu or install a CUDA build of "
                        f"torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps, but this torch has no Apple MPS support; use --device cpu")
    return name


def cpu_has_amx_bf16():
    """Only CPUs with AMX (Intel Sapphire Rapids and later) run bf16 matmuls faster than fp32; AVX512-BF16 alone
    does not."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def pick_autocast(device_type, dtype="auto"):
    """Returns (dtype name, autocast context): bf16 autocast where the hardware runs bf16 natively, else fp32."""
    if dtype == "auto":
        native_bf16 = (device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)) \
            or (device_type == "cpu" and cpu_has_amx_bf16())
        dtype = "bfloat16" if native_bf16 else "float32"
    elif dtype == "bfloat16" and device_type == "cpu" and not cpu_has_amx_bf16():
        print0("WARNING: --dtype bfloat16 on a CPU without AMX: bf16 autocast is emulated there and runs many times "
               "slower than float32; use --dtype float32")
    return dtype, torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def launch_ranks():
    """(rank, local_rank, world_size) from torchrun's env vars; (0, 0, 1) for a plain `python` launch."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def setup_distributed(cfg):
    """Returns (rank, local_rank, world_size, device), after joining the process group when there are several."""
    rank, local_rank, world_size = launch_ranks()
    device = pick_device(cfg.device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}" if world_size > 1 or device == "cuda" else device
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=cfg.dist_timeout_min))
    return rank, local_rank, world_size, device


_IS_MASTER = True


def print0(*args, **kwargs):
    """Prints on rank 0 only, so output is not repeated once per GPU."""
    if _IS_MASTER:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values, device):
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


class RunLog:
    """log.txt (human, append-only) and metrics.jsonl (one JSON object per step) in the log dir; rank 0 only.
    On a terminal, a tqdm bar shows loss, lr, tokens/s and ETA; batch jobs (no terminal) get plain lines only."""

    def __init__(self, log_dir, start_step, max_steps):
        self.log_path, self.metrics_path = os.path.join(log_dir, "log.txt"), os.path.join(log_dir, "metrics.jsonl")
        # Steps after the checkpoint we start from will be done again (a fresh start redoes step 0 too):
        # drop their metrics so no step is duplicated.
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                kept = [json.dumps(r) + "\n" for r in read_jsonl_lines(f) if 0 < start_step and r["step"] <= start_step]
            atomic_write_text(self.metrics_path, "".join(kept))
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm
            size = shutil.get_terminal_size()  # 80 x 24 when the terminal reports no size (tqdm would hide the bar)
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", file=sys.stdout, ncols=size.columns,
                            nrows=size.lines)

    def log(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def metrics(self, record):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, step, loss, lr, tokens_per_sec):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def read_jsonl_lines(f):
    """The records of a JSON-lines file, without a last line that a kill left half-written."""
    records = []
    for line in f:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


class RunLock:
    """An exclusive lock on {log_dir}/.lock; the kernel drops it when the process dies, so a killed run's lock
    is never stale. Stops two runs from writing the same checkpoints."""

    def __init__(self, log_dir):
        self.path = os.path.join(log_dir, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"{log_dir} is in use by a running fine-tune ({owner}); wait for it, stop it, or pass "
                            f"another --log_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    def release(self):
        os.close(self.fd)


def say(text):
    """A line on stderr from a signal handler; a stderr whose reader is gone (the launcher's pipe) is no error."""
    try:
        print(f"\n{text}", file=sys.stderr, flush=True)
    except OSError:
        pass


class StopSignal:
    """SIGTERM/SIGINT ask the loop to stop after the current step and save; a second one exits at once (with the
    run's own exit status once its last checkpoint is saved)."""

    REPEAT_WINDOW_S = 3.0  # a repeat this soon is the same request delivered twice, not a second one
    ORPHAN_EXIT_S = 30.0  # with its launcher gone, a worker exits at once if it has not stopped after this long

    def __init__(self):
        self.requested, self.requested_at = False, 0.0
        self.saved_exit_code = None  # set once the last checkpoint is saved: a later signal then exits with it
        self.orphaned = False  # the launcher died (die_with_launcher's signal)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if launcher_gone() and not self.orphaned:
            # The kernel signals again each time it hands this worker to a new parent: to another thread of a
            # dying multi-threaded launcher first (so getppid() still names the launcher), then to init. No
            # launcher will stop this worker if the step or the save hangs on a dead peer: a deadline does.
            self.orphaned = True
            deadline = threading.Timer(self.ORPHAN_EXIT_S, os._exit, (128 + signum,))
            deadline.daemon = True
            deadline.start()
            say(f"the launcher (pid {LAUNCHER_PID}) is gone: stopping after this step, within {self.ORPHAN_EXIT_S:g} s")
            if self.requested:
                return  # not a second request: the same death, seen again
        elif self.requested:
            # SLURM signals every process of the job and torchrun then forwards the signal to its workers again:
            # exiting on that repeat would lose the checkpoint the first one asked for
            if time.monotonic() - self.requested_at > self.REPEAT_WINDOW_S:
                os._exit(128 + signum if self.saved_exit_code is None else self.saved_exit_code)
            return
        self.requested, self.requested_at = True, time.monotonic()
        if not self.orphaned:
            say(f"{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint (send it "
                f"again, {self.REPEAT_WINDOW_S:g} s or more later, to exit at once)")

    def agreed(self, device):
        """True if any rank was signalled. Every rank calls this after every step, so all stop after the same one."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# -----------------------------------------------------------------------------
# sharded training (--fsdp), and the memory a run needs

def local(t):
    """This rank's part of a tensor: the shard of a DTensor (an --fsdp parameter), else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_model(model, device):
    """FSDP2 over every rank: each Block, then the rest (embeddings, final LayerNorm, output layer: the root). A
    parameter becomes a DTensor that holds 1/world_size of its rows here, and so do its gradient and AdamW state.
    A block's weights are gathered whole for its forward and again for its backward; the root's stay gathered
    through the step. The numerics are DDP's: fp32 weights and gradient reduction, bf16 only inside autocast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP2 learns which module is the root from the first forward; evaluate and generate call the blocks
    # directly, so one token goes through the whole model first
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
    model.reshard()
    return model


@contextmanager
def unsharded(model):
    """Under --fsdp, the root's weights (embeddings, output layer) gathered whole, for code that calls the model's
    parts instead of its forward (evaluate, generation); each block gathers its own in its forward, so every rank
    must run the same forwards meanwhile. Elsewhere nothing."""
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def broadcast_ids(ids, device):
    """Rank 0's token ids on every rank (--fsdp samples: all ranks feed the same tokens, so all run the same
    forwards whatever their rounding)."""
    t = torch.tensor(ids, dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def full_training_state(model, optimizer):
    """(model state dict, optimizer state dict) as one process holds them. Under --fsdp gathered from every rank's
    shards to rank 0, on the CPU (None, None on the other ranks), the optimizer state then turned from the
    parameter-name form torch.distributed.checkpoint gives into the index form of optimizer.state_dict()."""
    if not is_fsdp(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    names = optimizer_parameter_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    return model_state, {"state": {index[name]: v for name, v in optimizer_state["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                          for g in optimizer_state["param_groups"]]}


def load_optimizer_state(model, optimizer, state):
    """Loads a checkpoint's optimizer state (index form), whatever the strategy it was saved under: under --fsdp
    each rank keeps its shard of it."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = optimizer_parameter_names(model, optimizer)
    by_name = {"state": {names[i]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def optimizer_parameter_names(model, optimizer):
    """The names of the optimizer's parameters in its order, which is what its state's indices count."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


ACTIVATION_BYTES = {"float32": 64, "bfloat16": 46}  # saved for backward, per token, block and unit of n_embd


def memory_estimate(config, cfg, world_size, dtype):
    """Bytes per process that training needs, by part: fp32 weights, gradients and AdamW's two moments (16 bytes a
    parameter; 1/world_size of them under --fsdp, plus the root and two blocks gathered whole, with their
    gradients; DDP adds flat copies of the gradients to all-reduce), and the activations saved for backward:
    per token, ACTIVATION_BYTES x n_embd per block (counted on GPT-2's saved tensors), or with
    --activation_checkpointing only each block's fp32 input and one block's recomputed ones, plus the loss's
    logits chunk."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    block = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, mlp.c_proj (weights and biases), two LayerNorms
    root = (V + config.block_size) * C + 2 * C  # token and position embeddings (the output layer is tied), ln_f
    params = L * block + root
    shards = world_size if cfg.fsdp and world_size > 1 else 1
    parts = {"weights": 4 * params / shards, "gradients": 4 * params / shards, "AdamW": 8 * params / shards}
    if shards > 1:
        parts["gathered"] = 2 * 4 * (root + 2 * block)
    elif world_size > 1:
        parts["DDP buckets"] = 4 * params
    tokens, per_block = cfg.batch_size * cfg.sequence_length, ACTIVATION_BYTES[dtype]
    saved = (4 * L + per_block) if cfg.activation_checkpointing else per_block * L
    chunk_rows = max(1, (2 ** 27 if cfg.device.startswith("cuda") else 2 ** 24) // V)
    parts["activations"] = tokens * C * (saved + 8) + 4 * min(tokens, chunk_rows) * V
    parts["total"] = sum(parts.values())
    return parts


def format_memory(parts):
    return " + ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in parts.items() if k != "total") + \
        f" = {parts['total'] / 2 ** 30:.2f} GiB"


# -----------------------------------------------------------------------------
# evaluation and generation

EVAL_ROWS = 2 ** 14  # target positions whose hidden states evaluate() gathers before the output layer runs on them


@torch.no_grad()
def evaluate(model, stream, cfg, rank, world_size, device, autocast, num_categories, lockstep=False):
    """Token-weighted val loss over all ranks, overall and per category (index into the manifest's list).
    The hidden states at target positions are gathered over batches (up to EVAL_ROWS) and go through the output
    layer together, most of an evaluation's work: in full chunks, into one logits buffer.
    model: the GPT itself (not a DDP wrapper); its hidden_states and lm_head are called directly (under --fsdp
    within unsharded(model), with lockstep=True)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 * (num_categories + 1), dtype=torch.float64)  # [loss sum, count] overall, then per category
    hidden, targets, cats = [], [], []

    def add_losses():
        h, y, c = torch.cat(hidden), torch.cat(targets), torch.cat(cats)
        hidden.clear()  # the pieces go before the logits buffer comes
        targets.clear()
        cats.clear()
        with autocast:
            losses = target_cross_entropy(h, model.lm_head.weight, y, "none").double().cpu()
        sums[0] += losses.sum()
        sums[1] += losses.numel()
        sums[2::2] += torch.bincount(c, weights=losses, minlength=num_categories)
        sums[3::2] += torch.bincount(c, minlength=num_categories).double()

    batches = val_batches(stream, cfg.batch_size, cfg.sequence_length, cfg.val_tokens, cfg.loss_on, rank, world_size,
                          lockstep)
    for x, y, c in batches:
        positions, y = target_positions(y)  # on the host, as in training
        with autocast:
            hidden.append(model.hidden_states(x.to(device)).flatten(0, 1).index_select(0, positions.to(device)))
        targets.append(y.to(device))
        cats.append(c.reshape(-1)[positions])
        if sum(len(t) for t in targets) >= EVAL_ROWS:
            add_losses()
    if targets:
        add_losses()
    sums = torch.tensor(all_reduce_sum(sums.tolist(), device))
    model.train(was_training)
    per_category = [(s / n).item() if n > 0 else None for s, n in zip(sums[2::2], sums[3::2])]
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan"), per_category


@torch.no_grad()
def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_k=0, generator=None, use_cache=True,
             autocast=nullcontext(), on_token=None, output_layer=None):
    """Samples a continuation of prompt_tokens (list of ids) until <|endoftext|>, max_new_tokens or until prompt and
    answer fill the block size (the context window, as Hugging Face's max_length = n_positions counts it).
    Returns the new token ids (without the EOT). temperature 0 = greedy. on_token(id), if given, is called with
    each new id as it is sampled (never the EOT), so a caller can stream the text (model/chat.py).
    output_layer: generation_output_layer(model, autocast), made once by a caller that generates many times."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = torch.tensor([prompt_tokens], dtype=torch.long, device=device)
    cache = model.new_kv_cache() if use_cache else None
    out, step_input = [], idx
    if output_layer is None:
        output_layer = generation_output_layer(model, autocast)
    for _ in range(max_new_tokens):
        if idx.size(1) >= model.config.block_size:
            break
        with autocast:
            if use_cache:  # only the newest token goes through the model; earlier keys/values come from the cache
                h = GPT.hidden_states(model, step_input, cache)
            else:  # nanoGPT's loop: the whole sequence every time, the output layer at the last position only
                h = GPT.hidden_states(model, idx)
            logits = output_layer(h[:, -1])  # (1, vocab)
        next_id = sample_next(logits[0], temperature, top_k, generator)
        if next_id == EOT:
            break
        out.append(next_id)
        if on_token is not None:
            on_token(next_id)
        idx = torch.cat([idx, torch.tensor([[next_id]], device=device)], dim=1)
        step_input = idx[:, -1:]
    model.train(was_training)
    return out


def stop_reason(prompt_len, answer_len, max_new_tokens, block_size):
    """Why generate() ended an answer of answer_len tokens: 'eot' (the model stopped), 'max_new_tokens' or
    'block_size' (prompt and answer filled the context: cut, not a failure to stop)."""
    if answer_len >= max_new_tokens:
        return "max_new_tokens"
    if prompt_len + answer_len >= block_size:
        return "block_size"
    return "eot"


def generation_output_layer(model, autocast=nullcontext()):
    """The output layer for generation: (B, C) last hidden states -> (B, vocab) logits. On a CPU it multiplies by
    a (C, vocab) copy of the weight: with a few rows, MKL reads that layout faster than nn.Linear's (vocab, C), and
    the output layer is most of the bytes a small model reads per token. On a GPU, the output layer as it is.
    (So on a CPU a variant of lm_head with its own forward, e.g. a bias, needs its own branch here.)"""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return model.lm_head
    with autocast:  # the copy in the dtype autocast computes in (bf16 on CPUs with AMX), so it is not cast per token
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    weight_t = weight.detach().t().to(dtype).contiguous()  # (C, vocab)
    return lambda h: h @ weight_t


def sample_next(logits, temperature, top_k, generator):
    """The next token id from one position's logits (vocab,): argmax at temperature 0, else a draw from the
    softmax of logits / temperature, over the top_k logits only if top_k > 0."""
    logits = logits[:VOCAB_SIZE].float()  # never sample build-nanogpt's padding ids >= 50257
    if temperature == 0:
        return int(torch.argmax(logits))
    if top_k > 0:  # the k best and any tied with the k-th (as masking the rest to -inf keeps them): a draw among
        # these few costs far less than a 50,257-way one, from the same distribution
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        ids = torch.nonzero(logits >= kth).squeeze(1)
        return int(ids[torch.multinomial(F.softmax(logits[ids] / temperature, dim=-1), 1, generator=generator)])
    return int(torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=0, generators=None, autocast=nullcontext(),
                   sync=None):
    """generate() for several prompts (lists of ids) at once, with a generator per prompt: one forward per new
    token for all of them, so the weights are read once per token instead of once per prompt. Prompts are
    left-padded to the longest; padding is never attended to and each row counts positions from its own first
    token, so in fp32 each row gets the tokens generate() gives it alone (under bf16 the other shapes round
    differently and a near-tie can go the other way). sync(ids): what every rank takes as the step's new ids
    (under --fsdp, rank 0's)."""
    if not prompts:
        return []
    fits = [i for i, p in enumerate(prompts) if 0 < len(p) < model.config.block_size]
    if len(fits) < len(prompts):  # as generate(): nothing for a prompt longer than the model's context
        answers = iter(generate_batch(model, [prompts[i] for i in fits], max_new_tokens, temperature, top_k,
                                      generators and [generators[i] for i in fits], autocast, sync))
        return [next(answers) if i in fits else [] for i in range(len(prompts))]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    B, P = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    pad = P - lengths  # (B,)
    idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    key_ok = torch.arange(P, device=device)[None] >= pad[:, None]  # (B, P): False on padding
    # prompt pass: causal, no padding keys; a padding query sees itself only (a row of all False would give NaN)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()[None]  # (1, P, P)
    mask = causal & (key_ok[:, None, :] | torch.eye(P, dtype=torch.bool, device=device))  # (B, P, P)
    pos = (torch.arange(P, device=device)[None] - pad[:, None]).clamp(min=0)  # (B, P)
    cache, out = model.new_kv_cache(), [[] for _ in prompts]
    output_layer = generation_output_layer(model, autocast)
    block_size, rows = model.config.block_size, list(range(B))  # rows: the prompts still generating, in batch order
    for t in range(max_new_tokens):
        with autocast:
            logits = output_layer(GPT.hidden_states(model, idx, cache, pos, mask[:, None])[:, -1])  # (rows, vocab)
        if temperature == 0:  # greedy: one argmax for all rows (sample_next's, padding ids excluded)
            next_ids = logits[:, :VOCAB_SIZE].argmax(dim=-1).tolist()
        else:
            next_ids = [sample_next(logits[r], temperature, top_k, generators[b] if generators else None)
                        for r, b in enumerate(rows)]
        keep = []  # the rows that go on: no EOT, and room left in the context
        for r, (b, next_id) in enumerate(zip(rows, sync(next_ids) if sync else next_ids)):
            if next_id != EOT:
                out[b].append(next_id)
                if len(prompts[b]) + len(out[b]) < block_size:
                    keep.append(r)
        if not keep:
            break
        if len(keep) < len(rows):  # finished rows leave the batch, so the others do not pay for them
            keep_t = torch.tensor(keep, device=device)
            for layer in cache:
                layer[0], layer[1] = layer[0].index_select(0, keep_t), layer[1].index_select(0, keep_t)
            key_ok, lengths = key_ok.index_select(0, keep_t), lengths.index_select(0, keep_t)
            rows = [rows[r] for r in keep]
        idx = torch.tensor([[out[b][-1]] for b in rows], device=device)  # (rows, 1): each row's newest token
        key_ok = torch.cat([key_ok, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], dim=1)
        mask = key_ok[:, None, :]  # (rows, 1, keys): one query per row sees all its own tokens
        pos = (lengths + t).clamp(max=block_size - 1)[:, None]
    model.train(was_training)
    return out


def write_samples(model, enc, prompts, cfg, step, device, autocast, runlog, sync=None):
    """Answers the manifest's fixed val instructions; logs them and keeps them in samples.jsonl, then renders
    samples.md: each instruction with the answer before fine-tuning (step 0) beside the latest one. runlog None:
    a rank that only takes part in the generation (--fsdp)."""
    lines, records = [f"---- samples at step {step} ----"], []
    prompt_tokens = [enc.encode_ordinary(format_prompt(p["instruction"], p["context"])) for p in prompts]
    fits = [i for i, tokens in enumerate(prompt_tokens) if len(tokens) < model.config.block_size]
    # seeded by step and prompt: the same samples after a resume
    generators = [torch.Generator(device=device).manual_seed(cfg.seed + 1000 * step + i) for i in fits]
    answers = generate_batch(model, [prompt_tokens[i] for i in fits], cfg.generate_max_tokens, cfg.temperature,
                             cfg.top_k, generators, autocast, sync)
    if runlog is None:
        return
    answers = dict(zip(fits, answers))
    for i, p in enumerate(prompts):
        if i in answers:
            answer = enc.decode(answers[i]).strip()
        else:
            answer = (f"(prompt of {len(prompt_tokens[i])} tokens does not fit the model's "
                      f"{model.config.block_size}-token context)")
        lines.append(f"[{p['category']}] {p['instruction'][:200]}\n>>> {answer}")
        records.append({"step": step, "category": p["category"], "instruction": p["instruction"], "answer": answer})
    runlog.log("\n".join(lines))
    path = os.path.join(cfg.log_dir, "samples.jsonl")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = [r for r in read_jsonl_lines(f) if r["step"] < step]  # answers of steps a resume redid: replaced
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in old + records))
    first = {r["instruction"]: r["answer"] for r in old + records if r["step"] == 0}
    md = [f"# Samples: before fine-tuning (step 0) and at step {step}\n",
          f"| category | instruction | step 0 | step {step} |", "|---|---|---|---|"]

    def cell(text):
        return text.replace("|", "\\|").replace("\n", "<br>")

    for r in records:
        md.append(f"| {r['category']} | {cell(r['instruction'])} | {cell(first.get(r['instruction'], '-'))} | "
                  f"{cell(r['answer'])} |")
    atomic_write_text(os.path.join(cfg.log_dir, "samples.md"), "\n".join(md) + "\n")


def format_per_category(categories, losses):
    return " ".join(f"{c} {loss:.3f}" for c, loss in zip(categories, losses) if loss is not None)


def refresh_plot(log_dir, runlog):
    """Redraws {log_dir}/loss.png from metrics.jsonl (needs matplotlib, an optional dependency)."""
    from plot_loss import PlotError, plot_metrics
    try:
        plot_metrics(os.path.join(log_dir, "metrics.jsonl"), os.path.join(log_dir, "loss.png"))
    except PlotError as e:
        if not getattr(refresh_plot, "warned", False):
            runlog.log(f"note: loss.png is not drawn: {e}")
            refresh_plot.warned = True


# -----------------------------------------------------------------------------
# the run: set-up (start_run), then the loop (train)

def guide_warnings(cfg, steps_per_epoch):
    """Settings that go against the fine-tuning guide: warned about, not refused."""
    out = []
    if cfg.max_lr > 1e-4:
        out.append(f"--max_lr {cfg.max_lr:g} is high for fine-tuning (guide: ~6e-5, 1/10-1/100 of pretraining's); "
                   f"it may erase pretrained knowledge")
    if cfg.max_steps > steps_per_epoch * 1.25:  # the guide's own default (6 steps) is ~1.1-1.2 epochs
        out.append(f"{cfg.max_steps} steps = {cfg.max_steps / steps_per_epoch:.2f} epochs; the guide advises at most "
                   f"~1 epoch (catastrophic forgetting)")
    if cfg.weight_decay == 0:
        out.append("--weight_decay 0: the guide uses 0.01 to keep weights near the pretrained ones")
    if not 8 <= cfg.batch_size <= 32:
        out.append(f"--batch_size {cfg.batch_size} is outside the guide's 8-32")
    return out


def resolve_start(cfg, given, manifest, found=None, world_size=1):
    """The guide's resume order. Returns (model, cfg, checkpoint or None, init source, decision text); the returned
    settings are validated. found: what rank 0's scan of the log dir found for all ranks ((None, None) if nothing)."""
    path, ckpt = found or (None, None)
    if cfg.checkpoint_path:
        path = cfg.checkpoint_path
        try:
            ckpt = load_checkpoint(path, mmap=cfg.fsdp)
        except UserError as e:
            if cfg.strict_resume or not os.path.isfile(path):
                raise UserError(f"--checkpoint_path: {e}") from None
            if existing := list_checkpoints(cfg.log_dir):
                raise UserError(f"--checkpoint_path: {e}; and {cfg.log_dir} holds checkpoints of an earlier run "
                                f"(newest {os.path.basename(existing[-1][1])}) that a fresh start would overwrite: "
                                f"pass a checkpoint that loads, or choose another --log_dir") from None
            print0(f"WARNING: {e}; falling back to the pretrained model")
            path = None
    elif cfg.auto_resume or cfg.resume:
        if found is None:
            path, ckpt = find_resume_checkpoint(cfg.log_dir, mmap=cfg.fsdp)
        if ckpt is None and cfg.strict_resume:
            raise UserError(f"--strict_resume: no loadable checkpoint (model_NNNNN.pt) in {cfg.log_dir}")
    existing = list_checkpoints(cfg.log_dir) if ckpt is None else []
    best = os.path.join(cfg.log_dir, BEST_NAME)
    if ckpt is None and not existing and os.path.isfile(best):
        raise UserError(f"{cfg.log_dir} holds {BEST_NAME} of an earlier run, which a fresh start would overwrite: "
                        f"continue from it with --resume --checkpoint_path {best}, or choose another --log_dir")
    if existing:  # a fresh run would overwrite them under the same names, and its rotation would delete them
        newest = os.path.basename(existing[-1][1])
        if cfg.auto_resume or cfg.resume:
            raise UserError(f"{cfg.log_dir} holds checkpoints of an earlier run (newest {newest}), but none of them "
                            f"loads (see the warnings above); to start afresh, move them out of {cfg.log_dir} or "
                            f"choose another --log_dir")
        raise UserError(f"{cfg.log_dir} holds checkpoints of an earlier run (newest {newest}); a fresh start would "
                        f"overwrite them: pass --auto_resume to continue it, or choose another --log_dir")
    if ckpt is None:
        validate_config(cfg, world_size)  # before a random init builds a model of the given shape
        model, source = load_pretrained(cfg)
        return model, cfg, None, source, f"fresh start from {source}"
    # resume: saved settings, overridden by the ones given on this command line (or in its --config file)
    saved = ckpt["config"]
    merged = {k: (getattr(cfg, k) if k in given or k in LAUNCH_FIELDS or k not in saved else saved[k])
              for k in asdict(cfg)}
    if "max_steps" in given and "num_epochs" not in given:  # a saved --num_epochs would set max_steps again
        merged["num_epochs"] = 0.0
    changed = [f"{k}: {saved[k]} -> {merged[k]}" for k in merged
               if k in saved and k not in LAUNCH_FIELDS and saved[k] != merged[k]]
    if changed:
        print0("resume: command-line values override the checkpoint's: " + ", ".join(changed))
    config = GPTConfig(**ckpt["model_config"])
    bad_shape = [f"{k} {getattr(config, k)} (checkpoint) vs {getattr(cfg, k)} (command line)"
                 for k in SHAPE_FIELDS if k in given and getattr(cfg, k) != getattr(config, k)]
    if bad_shape:
        raise UserError(f"{path}: cannot resume with a different model shape: {', '.join(bad_shape)}")
    validate_config(TrainConfig(**merged), world_size)
    fingerprint = data_fingerprint(manifest)
    if ckpt["data_fingerprint"] != fingerprint and not cfg.allow_data_change:
        raise UserError(f"{path} was trained on other data (fingerprint {ckpt['data_fingerprint']}) than "
                        f"{cfg.data_dir}/ now holds ({fingerprint}, source {manifest['source']}); re-run "
                        f"prepare_dolly.py as before, or pass --allow_data_change")
    return (model_from_checkpoint(ckpt, path), TrainConfig(**merged), ckpt, ckpt.get("init_source", "?"),
            f"resuming from {path} at step {ckpt['step']}")


def open_log_dir(log_dir):
    """Creates the log dir, takes its lock and removes temp files of writes that were killed; rank 0 only."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        lock = RunLock(log_dir)
    except OSError as e:
        raise UserError(f"--log_dir {log_dir}: cannot write there ({e.strerror}); choose a writable "
                        f"directory") from None
    remove_temp_files(log_dir)
    return lock


def scan_for_resume(cfg, rank, world_size):
    """With several processes, rank 0 picks the checkpoint to resume from and every rank then reads that file:
    (path, ckpt), or (None, None) when none loads. None where resolve_start scans itself."""
    if world_size == 1 or not (cfg.auto_resume or cfg.resume) or cfg.checkpoint_path:
        return None
    found = find_resume_checkpoint(cfg.log_dir, mmap=cfg.fsdp) if rank == 0 else (None, None)
    choice = [found[0]]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] and rank > 0:
        found = (choice[0], load_checkpoint(choice[0], mmap=cfg.fsdp))
    return found if choice[0] else (None, None)  # nothing loads: the other ranks need not look again


def set_aside_newer_checkpoints(log_dir, start_step):
    """Checkpoints newer than the one we resume from belong to the abandoned future of this run: renamed out of
    rotation and auto-resume (not deleted), so a later --auto_resume cannot jump back to them."""
    newer = [path for step, path in list_checkpoints(log_dir) if step > start_step]
    best = os.path.join(log_dir, BEST_NAME)
    try:  # only its step is read (memory-mapped): the best of that future is set aside with it
        if os.path.isfile(best) and torch.load(best, weights_only=True, mmap=True)["step"] > start_step:
            newer.append(best)
    except Exception:  # unreadable: the tools skip it anyway
        pass
    for path in newer:
        os.replace(path, path + ".superseded")
        print0(f"note: {os.path.basename(path)} is newer than the checkpoint resumed from; renamed to "
               f"{os.path.basename(path)}.superseded")


@dataclass
class Run:
    """What start_run sets up for the loop in train()."""
    cfg: TrainConfig
    rank: int
    world_size: int
    device: str
    autocast: object  # the autocast context of the forward passes (or a nullcontext)
    model: GPT  # the model itself: saved, evaluated, sampled
    train_model: nn.Module  # what the training step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    val_stream: TokenStream | None  # None when the val split is empty
    manifest: dict
    fingerprint: str  # of the data, kept in every checkpoint
    init_source: str  # where the weights first came from
    init_seed: int  # the seed of the run's first start (what a random init was drawn with)
    log: RunLog | None  # rank 0 only
    enc: object | None  # the tokenizer for samples, rank 0 only
    stop: StopSignal
    start_step: int = 0
    best_val_loss: float = float("inf")
    prev_train_loss: float | None = None  # train loss at the last evaluation (the guide's overfitting check)


def parallelize(model, cfg, world_size, local_rank, device):
    """The model the training step calls, and whether it is compiled: compiled first (the transformer body only),
    then wrapped by DDP or sharded by FSDP when there are several processes."""
    device_type = device.split(":")[0]
    model.activation_checkpointing = cfg.activation_checkpointing
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda")
    if compiled:
        # Only the transformer body: the loss picks a different number of target positions every batch,
        # which would make a compiled whole model recompile at every step.
        model.hidden_states = torch.compile(model.hidden_states)
    if world_size > 1 and cfg.fsdp:
        return shard_model(model, device), compiled
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None), compiled
    return model, compiled


def start_run(cfg, given, cleanup):
    """Everything before the first step: process group, log dir and lock, data, model (the guide's resume order),
    compile, DDP or FSDP, optimizer and loader state, the start-up summary. Registers in cleanup (an ExitStack)
    what train() must undo whatever happens later."""
    global _IS_MASTER
    # validated before the process group, which a bad value would break with a C++ traceback; on resume, the rest
    # of the settings is checked once merged with the checkpoint's
    resuming = cfg.auto_resume or cfg.resume or cfg.checkpoint_path
    validate_config(cfg, launch_ranks()[2], launch_only=resuming)
    rank, local_rank, world_size, device = setup_distributed(cfg)
    if dist.is_initialized():
        cleanup.callback(dist.destroy_process_group)
    _IS_MASTER = rank == 0
    device_type = device.split(":")[0]
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # every rank the same: identical init; nothing in training is random
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    manifest = load_manifest(cfg.data_dir)
    if rank == 0:
        cleanup.callback(open_log_dir(cfg.log_dir).release)
    if world_size > 1:
        dist.barrier()

    found = scan_for_resume(cfg, rank, world_size)
    model, cfg, ckpt, init_source, decision = resolve_start(cfg, given, manifest, found, world_size)
    if cfg.sequence_length > model.config.block_size:
        raise UserError(f"--sequence_length {cfg.sequence_length} > the model's block_size {model.config.block_size}")
    if model.config.vocab_size < manifest["vocab_size"]:
        raise UserError(f"the model's vocab_size {model.config.vocab_size} < the data's {manifest['vocab_size']} "
                        f"(GPT-2 tokenizer)")
    if cfg.fsdp and device_type == "mps":
        raise UserError("--fsdp needs CUDA GPUs (NCCL) or CPUs (gloo); Apple's MPS has no process-group backend")
    if cfg.fsdp and world_size == 1:
        print0("note: --fsdp with one process: there is nothing to shard over, so the model trains unsharded")
    model.to(device)

    grad_accum = cfg.total_batch_size // (cfg.batch_size * cfg.sequence_length * world_size)
    steps_per_epoch = manifest["splits"]["train"]["tokens"] / cfg.total_batch_size
    if cfg.num_epochs > 0:
        cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.num_epochs * steps_per_epoch)))
    dtype, autocast = pick_autocast(device_type, cfg.dtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    stream = TokenStream(cfg.data_dir, "train", manifest)
    val_stream = TokenStream(cfg.data_dir, "val", manifest) if manifest["splits"]["val"]["tokens"] > 1 else None
    loader = DataLoader(stream, cfg.batch_size, cfg.sequence_length, grad_accum, rank, world_size, cfg.loss_on)
    train_model, compiled = parallelize(model, cfg, world_size, local_rank, device)
    optimizer = model.configure_optimizer(cfg, device_type)  # after FSDP, which replaces the parameters
    run = Run(cfg=cfg, rank=rank, world_size=world_size, device=device, autocast=autocast, model=model,
              train_model=train_model, optimizer=optimizer, loader=loader, val_stream=val_stream, manifest=manifest,
              fingerprint=data_fingerprint(manifest), init_source=init_source, init_seed=cfg.seed, log=None, enc=None,
              stop=None)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        loader.load_state_dict(ckpt["train_loader_state"], cfg.allow_data_change)
        restore_rng_state(ckpt["rng"])
        run.start_step, run.prev_train_loss = ckpt["step"], ckpt.get("prev_train_loss")
        run.best_val_loss = ckpt["best_val_loss"] if ckpt.get("best_val_loss") is not None else float("inf")
        run.init_seed = ckpt.get("init_seed", ckpt["config"]["seed"])

    if ckpt is not None and rank == 0:  # here, after the start-up checks: a start that fails renames nothing
        set_aside_newer_checkpoints(cfg.log_dir, run.start_step)
    if rank == 0:
        run.log = RunLog(cfg.log_dir, run.start_step, cfg.max_steps)
        cleanup.callback(run.log.close)
    run.stop = StopSignal()
    if (rank == 0 or is_fsdp(model)) and cfg.generate_interval > 0:  # under FSDP every rank takes part in samples
        run.enc = get_tokenizer(verbose=rank == 0)
    log_start(run, decision, dtype, compiled, grad_accum, steps_per_epoch)
    return run


def log_start(run, decision, dtype, compiled, grad_accum, steps_per_epoch):
    """The start-up summary (rank 0): the resume decision, where the model came from, the strategy, the memory
    estimate (with a warning on a GPU it does not fit), the data, tokens per step and epochs, the guide's warnings."""
    cfg, model, manifest, device, world_size = run.cfg, run.model, run.manifest, run.device, run.world_size
    n_params = sum(p.numel() for p in model.parameters())
    strategy = "FSDP" if is_fsdp(model) else "DDP" if world_size > 1 else "one process"
    checkpointing = " | activation checkpointing" if cfg.activation_checkpointing else ""
    log0(run, f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {decision}")
    log0(run, f"device {device} x {world_size} process(es) ({strategy}{checkpointing}) | dtype {dtype} | compile "
              f"{compiled} | model {n_params / 1e6:.2f}M params {asdict(model.config)} from {run.init_source}")
    memory = memory_estimate(model.config, dataclasses.replace(cfg, device=device), world_size, dtype)
    log0(run, f"memory per process (estimate): {format_memory(memory)}")
    if device.startswith("cuda") and run.rank == 0 and memory["total"] > torch.cuda.mem_get_info(device)[0]:
        log0(run, f"WARNING: this run needs about {memory['total'] / 2 ** 30:.1f} GiB per GPU, more than the "
                  f"{torch.cuda.mem_get_info(device)[0] / 2 ** 30:.1f} GiB free on {device}; lower --batch_size "
                  f"(gradient accumulation keeps --total_batch_size), add --activation_checkpointing, or shard it "
                  f"with --fsdp over more GPUs")
    train_tokens, val_tokens = (manifest["splits"][s]["tokens"] for s in ("train", "val"))
    log0(run, f"data {cfg.data_dir}: {train_tokens:,} train tokens, {val_tokens:,} val tokens ({manifest['source']}) | "
              f"{cfg.total_batch_size:,} tokens/step = {cfg.batch_size} x {cfg.sequence_length} x {grad_accum} accum "
              f"x {world_size} procs | {steps_per_epoch:.2f} steps/epoch | {cfg.max_steps} steps = "
              f"{cfg.max_steps / steps_per_epoch:.2f} epochs")
    splits = [manifest["splits"][s]["tokens_per_category"] for s in ("train", "val")]
    log0(run, "tokens per category (train + val): "
              + ", ".join(f"{c} {sum(s.get(c, 0) for s in splits):,}" for c in manifest["categories"]))
    for warning in guide_warnings(cfg, steps_per_epoch):
        log0(run, f"WARNING (guide): {warning}")


def log0(run, text):
    """A line for log.txt and the terminal, from rank 0."""
    if run.log is not None:
        run.log.log(text)


def evaluate_run(run, step, train_loss=None):
    """The val loss at this step, logged; returns (val_loss, per-category losses)."""
    categories = run.manifest["categories"]
    with unsharded(run.model):
        val_loss, per_cat = evaluate(run.model, run.val_stream, run.cfg, run.rank, run.world_size, run.device,
                                     run.autocast, len(categories), lockstep=is_fsdp(run.model))
    note = " (before fine-tuning)" if step == 0 else ""
    log0(run, f"step {step:5d}/{run.cfg.max_steps} | val loss {val_loss:.4f}{note} | "
              f"{format_per_category(categories, per_cat)}")
    # the guide's overfitting check: val loss up while train loss still goes down
    if train_loss is not None and val_loss > run.best_val_loss and run.prev_train_loss is not None \
            and train_loss < run.prev_train_loss:
        log0(run, "WARNING: overfitting detected: val loss rose above its best while train loss fell; "
                  "consider fewer steps or a lower --max_lr")
    return val_loss, dict(zip(categories, per_cat))


def save_checkpoint(run, step, val_loss, names):
    """A full checkpoint from rank 0 under each of names (the first written, the rest hard links to it); every rank
    learns whether it worked. A failed save stops the run with earlier checkpoints intact."""
    ok = True
    if run.rank == 0 or is_fsdp(run.model):  # under FSDP every rank sends its shards
        state = checkpoint_state(run.model, run.optimizer, run.loader, run.cfg, step, val_loss=val_loss,
                                 best_val_loss=run.best_val_loss, prev_train_loss=run.prev_train_loss,
                                 init_source=run.init_source, init_seed=run.init_seed, fingerprint=run.fingerprint,
                                 world_size=run.world_size)
    if run.rank == 0:
        log_dir = run.cfg.log_dir
        try:
            first = os.path.join(log_dir, names[0])
            atomic_torch_save(state, first)
            for name in names[1:]:  # model_best.pt on a checkpoint step: the same bytes, not serialized again
                atomic_link(first, os.path.join(log_dir, name))
            prune_checkpoints(log_dir, run.cfg.keep_last_n_checkpoints)
        except (OSError, RuntimeError) as e:  # torch.save reports a short write (disk full) as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "a short write: is the disk full?"
            free = shutil.disk_usage(log_dir).free / 2 ** 20
            log0(run, f"ERROR: saving {names} in {log_dir} failed ({reason}; {free:,.0f} MiB free there); "
                      f"earlier checkpoints are intact")
            ok = False
    if run.world_size > 1:
        ok = all_reduce_sum([0.0 if ok else 1.0], run.device)[0] == 0
    if not ok:
        raise UserError(f"checkpoint save failed in {run.cfg.log_dir}; free space or fix permissions, then rerun "
                        f"with --auto_resume")


def sample_run(run, step):
    """The generation samples at this step, from rank 0; under --fsdp every rank generates (rank 0's tokens) and
    rank 0 writes."""
    sync = (lambda ids: broadcast_ids(ids, run.device)) if is_fsdp(run.model) else None
    with unsharded(run.model):
        write_samples(run.model, run.enc, run.manifest.get("sample_prompts", []), run.cfg, step, run.device,
                      run.autocast, run.log, sync)


def nonfinite_weights(run):
    """count_nonfinite of the whole model; under --fsdp every rank counts its shards and the counts are added up,
    so that all ranks stop together."""
    bad = count_nonfinite(run.model)
    return int(all_reduce_sum([bad], run.device)[0]) if is_fsdp(run.model) else bad


def diverged(run, step, what, lr):
    """The error that stops a run whose loss, gradients or weights are no longer finite (also in log.txt)."""
    message = (f"training diverged at step {step} ({what}; lr {lr:.2e}); nothing was saved from it. Lower --max_lr "
               f"and start again in a new --log_dir, or go on from an earlier checkpoint with --resume "
               f"--checkpoint_path")
    log0(run, f"ERROR: {message}")
    return UserError(message)


def train(cfg, given=frozenset()):
    """The fine-tune: start_run, then the loop. Returns the exit status (0 done, EXIT_PREEMPTED stopped by a
    signal after saving); raises UserError for what the user must fix."""
    with ExitStack() as cleanup:  # the lock, the log and the process group are released whatever happens
        run = start_run(cfg, given, cleanup)
        cfg, model, optimizer, loader, log = run.cfg, run.model, run.optimizer, run.loader, run.log
        if run.start_step == 0:  # step 0: the model before fine-tuning
            if run.val_stream is not None:
                val_loss, per_category = evaluate_run(run, 0)
                if log:
                    log.metrics({"step": 0, "val_loss": val_loss, "val_loss_per_category": per_category})
                    refresh_plot(cfg.log_dir, log)
            if run.enc is not None:
                sample_run(run, 0)

        step = run.start_step
        while step < cfg.max_steps:
            t0 = time.time()
            # ---------------- BEGIN optimizer step ----------------
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches, num_targets = loader.next_step()
            loss_sum = accumulate_gradients(run.train_model, batches, num_targets, run.world_size, run.device,
                                            run.autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # ---------------- END optimizer step: the rest is diagnostics and saving ----------------
            train_loss = all_reduce_sum([loss_sum.item()], run.device)[0] / max(1, num_targets)
            if run.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.time() - t0
            grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):  # this step's update made them NaN/inf
                raise diverged(run, step, f"loss {train_loss}, gradient norm {grad_norm}", lr)
            tokens_per_sec = cfg.total_batch_size / dt
            record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_sec": tokens_per_sec, "epoch": loader.position / loader.stream.num_tokens}
            log0(run, f"step {step:5d}/{cfg.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | norm {grad_norm:.4f} | "
                      f"{dt * 1000:.0f}ms | {tokens_per_sec:,.0f} tok/s | epoch {record['epoch']:.2f}")
            last_step = step == cfg.max_steps
            val_loss, is_best = None, False
            if run.val_stream is not None and (step % cfg.eval_interval == 0 or last_step):
                val_loss, per_category = evaluate_run(run, step, train_loss)
                record.update(val_loss=val_loss, val_loss_per_category=per_category)
                is_best = math.isfinite(val_loss) and val_loss < run.best_val_loss  # NaN is never best
                run.best_val_loss = val_loss if is_best else run.best_val_loss
                run.prev_train_loss = train_loss
            if log:
                log.metrics(record)
                log.progress(step, train_loss, lr, tokens_per_sec)
                if val_loss is not None:
                    refresh_plot(cfg.log_dir, log)
            if run.enc is not None and (step % cfg.generate_interval == 0 or last_step):
                sample_run(run, step)
            stopping = run.stop.agreed(run.device)
            names = [checkpoint_name(step)] if step % cfg.checkpoint_interval == 0 or last_step or stopping else []
            names += [BEST_NAME] if is_best else []
            if names and nonfinite_weights(run):
                raise diverged(run, step, "weights not finite", lr)  # e.g. a finite but huge update: never saved
            if names:
                save_checkpoint(run, step, val_loss, names)
            if stopping and not last_step:
                run.stop.saved_exit_code = EXIT_PREEMPTED
                print0(f"stopped after step {step}; checkpoint {checkpoint_name(step)} saved. Continue with "
                       f"--auto_resume")
                return EXIT_PREEMPTED
        run.stop.saved_exit_code = 0
        # answers of at most half the context, so that a model that does not stop shows as such, not as cut
        answer_tokens = min(MAX_NEW_TOKENS, model.config.block_size // 2)
        log0(run, f"done. Judge the fine-tune against the model it started from: python model/eval_dolly.py "
                  f"--data_dir {cfg.data_dir} --checkpoint start:{cfg.log_dir} --checkpoint {cfg.log_dir}"
                  + (f" --max_new_tokens {answer_tokens}" if answer_tokens < MAX_NEW_TOKENS else ""))
        return 0


# -----------------------------------------------------------------------------
# main: one line per error, also under torchrun

ERROR_WAIT_S = 5.0  # how long a rank other than 0 waits to see whether rank 0 reports the same error


def report_error(message):
    """Prints `error: message` once per run. Under torchrun every rank mostly hits the same error (the same flags,
    data and checkpoint): rank 0 prints it, and another rank prints its own only if rank 0 did not report the same
    line within ERROR_WAIT_S: an error that only it hit stays visible. The ranks compare notes through torchrun's
    own store (TORCHELASTIC_USE_AGENT_STORE), which exists before the process group does."""
    rank, _, world_size = launch_ranks()
    if world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=ERROR_WAIT_S))
            key = f"finetune_dolly/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
            store.set(key + str(rank), message)
            deadline = time.monotonic() + ERROR_WAIT_S
            while rank != 0 and not store.check([key + "0"]) and time.monotonic() < deadline:
                time.sleep(0.05)  # polled: a store.wait that times out logs C++ warnings
            if rank != 0 and store.check([key + "0"]) and store.get(key + "0").decode() == message:
                return
        except Exception:  # no answer from rank 0 in time, or no store: print it here
            pass
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv=None):
    try:
        cfg, given = parse_args(argv)
        return train(cfg, given)
    except UserError as e:
        report_error(str(e))
        return EXIT_ERROR
    finally:
        # DDP's wrapper lives in reference cycles. Collected at interpreter exit instead, after its process group
        # is gone, it can abort the process (SIGABRT, "terminate called without an active exception") on gloo.
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
