"""
Export a GPT-2 fine-tuned by model/finetune_dolly.py to the Hugging Face layout, so that transformers (and what is
built on it: pipelines, vLLM, TGI, llama.cpp's converter, eval harnesses) can load it. Offline; nothing downloaded.

The checkpoint is read by the rule chat.py uses (fd.load_model): a fine-tune checkpoint, a log dir (its
model_best.pt, else its newest loadable model_NNNNN.pt), a build-nanogpt checkpoint, a Hub name or a Hugging Face
folder. --out_dir gets:
    model.safetensors        the weights with GPT-2's Hugging Face names; Conv1D (in, out) matrices; the
                             vocabulary cut to GPT-2's 50,257 rows (build-nanogpt pads to 50,304); lm_head left out
                             (tied to the token embedding)
    config.json              GPT2LMHeadModel, n_positions = the model's block_size
    generation_config.json   greedy decoding, stop at <|endoftext|>
    tokenizer.json, tokenizer_config.json, chat_template.jinja, vocab.json, merges.txt
                             GPT-2's tokenizer, made from the bundled model/gpt2.tiktoken; the chat template is the
                             instruction template the model was fine-tuned with
    README.md                the model card: license, data, training settings, val loss, usage, credits
All files are written to a staging folder next to --out_dir and renamed into place when complete.

Run:
    python model/export_hf.py --checkpoint logs_finetune --out_dir export/gpt2-dolly
    python model/export_hf.py --checkpoint logs_finetune/model_00006.pt --out_dir export/gpt2-dolly --force
    python model/export_hf.py --checkpoint logs_finetune --out_dir export/gpt2-dolly-bf16 --dtype bfloat16
    python model/export_hf.py --checkpoint logs/model_19072.pt --out_dir export/gpt2-124m --license mit

Then, with transformers:
    python -c "from transformers import pipeline; g = pipeline('text-generation', model='export/gpt2-dolly');
               print(g([{'role': 'user', 'content': 'Name three primary colors.'}], do_sample=False))"

Exit status: 0 done; 1 error (one line says what to do); 2 bad command line.
"""

import argparse
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout

import torch

import finetune_dolly as fd
from prepare_dolly import (BUNDLED_RANKS, EOT, EOT_TEXT, HF_DATASET, PROMPT_TEMPLATE, PROMPT_TEMPLATE_WITH_CONTEXT,
                           VOCAB_SIZE, DataError, bundled_ranks)

try:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
except ImportError as e:  # an install that predates the export
    sys.exit(f"error: the export needs {e.name}; install it with `pip install -r requirements.txt`")

# -----------------------------------------------------------------------------
# settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LICENSE = "cc-by-sa-3.0"  # the Dolly-15k data's license
HUB_ORG = "openai-community"  # where the Hub keeps OpenAI's GPT-2 checkpoints (gpt2 -> openai-community/gpt2)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "vocab.json", "merges.txt")

# -----------------------------------------------------------------------------
# weights and config.json: the model as transformers' GPT2LMHeadModel holds it


def hf_tensors(model):
    """Our GPT's weights under GPT-2's Hugging Face names and layout, {name: tensor}: views of the model's weights,
    not copies (write_safetensors lays each out as it writes it). HF's GPT-2 keeps its four projection matrices in
    Conv1D modules, stored (in, out): the transpose of nn.Linear's (out, in). lm_head is left out: the config ties it
    to the token embedding (and safetensors refuses two names for one tensor)."""
    if model.config.vocab_size < VOCAB_SIZE:
        raise fd.UserError(f"the model has {model.config.vocab_size:,} token embeddings, fewer than GPT-2's "
                           f"{VOCAB_SIZE:,}: not a GPT-2 this export can write")
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            t = t[:VOCAB_SIZE]  # build-nanogpt's padding rows (ids >= 50257) are never a token
        elif name.endswith(CONV1D_WEIGHTS):
            t = t.t()  # (in, out)
        tensors[name] = t.detach()
    return tensors


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(tensors, dtype, path, chunk_bytes=2 ** 21):
    """Writes tensors (1-D or 2-D, views such as slices and transposes) to path as dtype in the safetensors format,
    byte for byte what safetensors.torch.save_file(contiguous copies, path, metadata={"format": "pt"}) writes (a test
    checks it): the header's length in 8 bytes, the JSON header padded with spaces to a multiple of 8 bytes, then the
    tensors in name order. A tensor that needs a transpose or a cast is laid out a chunk of rows at a time in two
    small buffers, so the writer holds no copy of the model in memory."""
    names, header, end = sorted(tensors), {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = tensors[name].numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [end, end + size]}
        end += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    n = max(chunk_bytes // dtype.itemsize, *(t[0].numel() for t in tensors.values()))  # our weights: 1-D or 2-D
    buffer, columns = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            t = tensors[name]
            rows = max(1, n // t[0].numel())
            for i in range(0, len(t), rows):
                part = t[i:i + rows]
                if not part.is_contiguous() or part.stride(-1) != 1:  # rows of a transposed matrix
                    # its columns in the original, read row by row in memory order, then transposed in the buffers
                    block = columns[:part.numel()].view(part.t().shape).copy_(part.t())
                    part = buffer[:part.numel()].view(part.shape).copy_(block.t())
                elif part.dtype != dtype:
                    part = buffer[:part.numel()].view(part.shape).copy_(part)
                if t.dtype != dtype and not torch.isfinite(part).all():  # a cast to float16 can overflow
                    instead = "float32" if dtype == torch.bfloat16 else "bfloat16 or float32"
                    raise fd.UserError(f"{name} holds values beyond {dtype_name(dtype)}'s range (max "
                                       f"{torch.finfo(dtype).max:.4g}); export with --dtype {instead}")
                f.write(part.reshape(-1).view(torch.uint8).numpy())


def dtype_name(dtype):
    return next(name for name, d in DTYPES.items() if d == dtype)


def hf_config(config, dtype):
    """config.json as transformers 5 writes GPT2Config (minus transformers_version), plus n_ctx and torch_dtype,
    which older readers (transformers 4, llama.cpp's convert_hf_to_gguf.py) look for."""
    return {
        "activation_function": "gelu_new",  # the tanh approximation, as our MLP
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,  # no dropout: the model was trained without it
        "bos_token_id": EOT,
        "dtype": dtype_name(dtype),
        "embd_pdrop": 0.0,
        "eos_token_id": EOT,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our model uses
        "model_type": "gpt2",
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": None,  # 4 x n_embd
        "n_layer": config.n_layer,
        "n_positions": config.block_size,
        "pad_token_id": EOT,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "torch_dtype": dtype_name(dtype),
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def generation_config(config):
    """Greedy decoding (chat.py --temperature 0) until <|endoftext|> or prompt and answer fill the context
    (max_length = n_positions, where chat.py stops too)."""
    return {"bos_token_id": EOT, "do_sample": False, "eos_token_id": EOT, "max_length": config.block_size,
            "pad_token_id": EOT}


# -----------------------------------------------------------------------------
# the tokenizer: GPT-2's byte-level BPE from the bundled tiktoken rank file, built with the tokenizers library

# The instruction template of prepare_dolly.format_prompt as a chat template. One user message is the instruction; a
# context comes as a template variable, apply_chat_template(messages, context=TEXT). Both are stripped, as
# format_prompt strips them. The response header is always rendered: it is where this model's answer starts.
CHAT_TEMPLATE = (
    "{%- if messages | length != 1 or messages[0]['role'] != 'user' or messages[0]['content'] is not string -%}\n"
    "{{- raise_exception('This model was fine-tuned on single instructions: pass exactly one message, "
    "{\"role\": \"user\", \"content\": INSTRUCTION} (a context goes in apply_chat_template(..., context=TEXT)); got "
    "' ~ (messages | length) ~ ' message(s), roles: ' ~ (messages | map(attribute='role') | join(', '))) -}}\n"
    "{%- endif -%}\n"
    "{%- set context = context | default('', true) | string | trim -%}\n"
    "{{- '### Instruction:\\n' ~ (messages[0]['content'] | trim) ~ '\\n\\n' -}}\n"
    "{%- if context -%}\n"
    "{{- '### Context:\\n' ~ context ~ '\\n\\n' -}}\n"
    "{%- endif -%}\n"
    "{{- '### Response:\\n' -}}\n"
)


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (its encoder.py): vocab.json and merges.txt spell tokens with it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + i for i in range(len(others))])}


def merge_of(token, rank, ranks):
    """The pair of tokens GPT-2's BPE merged into token (rank >= 256): BPE on token's bytes with only the merges
    older than rank (tiktoken's rule: the adjacent pair whose concatenation has the lowest rank goes first) ends in
    exactly these two parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise DataError(f"{BUNDLED_RANKS}: token {rank} is not the merge of two earlier tokens; is it GPT-2's file?")
    return tuple(parts)


@functools.lru_cache(maxsize=1)
def gpt2_vocab_merges():
    """GPT-2's vocabulary ({token: id}, <|endoftext|> included) and its 50,000 merges in order, recovered from the
    tiktoken ranks (a rank is 256 + the index of the merge that made the token), spelled as vocab.json and
    merges.txt spell them."""
    ranks = bundled_ranks()
    byte_char = bytes_to_unicode()

    def spell(b):
        return "".join(byte_char[x] for x in b)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT
    merges = [tuple(map(spell, merge_of(token, rank, ranks)))
              for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    return vocab, merges


def build_tokenizer():
    """GPT-2's fast tokenizer as transformers' GPT2Tokenizer builds it (so that its tokenizer.json reads back
    unchanged): byte-level pre-tokenizer with GPT-2's split regex, BPE with the merges in order, and <|endoftext|>
    as a special token."""
    vocab, merges = gpt2_vocab_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    return tok


def tokenizer_config(block_size):
    """tokenizer_config.json as transformers 5 writes it for this tokenizer; <|endoftext|> is bos, eos, pad and unk."""
    return {"add_prefix_space": False, "backend": "tokenizers", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
            "errors": "replace", "model_max_length": block_size, "pad_token": EOT_TEXT,
            "tokenizer_class": "GPT2Tokenizer", "unk_token": EOT_TEXT}


def write_tokenizer(folder, block_size):
    """Writes tokenizer.json, tokenizer_config.json, chat_template.jinja (transformers 5's files for a fast
    tokenizer) and vocab.json, merges.txt (for tools that read GPT-2's original files) into folder."""
    tok = build_tokenizer()
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok.model.save(folder)  # vocab.json, merges.txt
    write_text(os.path.join(folder, "tokenizer_config.json"), json_text(tokenizer_config(block_size)))
    write_text(os.path.join(folder, "chat_template.jinja"), CHAT_TEMPLATE)


# -----------------------------------------------------------------------------
# the model card (README.md with the Hub's YAML header)


def run_metrics(loaded):
    """(val loss record at step 0, record at the checkpoint's step) from the metrics.jsonl of the checkpoint's run,
    when it lies next to the checkpoint and its val loss at that step is the checkpoint's; else (None, None)."""
    ckpt = loaded.checkpoint
    path = os.path.join(os.path.dirname(os.path.abspath(loaded.path)), "metrics.jsonl")
    if ckpt is None or not os.path.isfile(path):
        return None, None
    with open(path, encoding="utf-8") as f:
        records = {r.get("step"): r for r in fd.read_jsonl_lines(f) if isinstance(r, dict) and "val_loss" in r}
    before, after = records.get(0), records.get(ckpt["step"])
    if after is None or not isinstance(ckpt.get("val_loss"), float) or not math.isclose(
            after["val_loss"], ckpt["val_loss"], rel_tol=1e-6):
        return None, None  # another run's metrics, or the checkpoint's step was not evaluated
    return before, after


def describe_data(ckpt):
    """The fine-tune's data in words, from the manifest in its --data_dir when that is still there and holds the
    same data (the checkpoint's data fingerprint); else None."""
    try:
        manifest = fd.load_manifest(ckpt["config"]["data_dir"])
    except (fd.UserError, KeyError, TypeError):
        return None
    if fd.data_fingerprint(manifest) != ckpt.get("data_fingerprint"):
        return None
    source = manifest["source"]
    if source == f"hf:{HF_DATASET}":
        what = "Dolly-15k"
    elif source.startswith("bundled:"):
        what = "the sample of Dolly-15k bundled with the project"
    else:
        what = f"a Dolly-15k file ({os.path.basename(source)})"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    return f"{what}: {train['records']:,} train records ({train['tokens']:,} tokens), {val['records']:,} val records"


def describe_start(init_source):
    """What the fine-tune started from, in words, and the Hub model to name as base_model (or None)."""
    kind, _, src = init_source.partition(":")
    if init_source == "random":
        return "a random init (not a pretrained GPT-2: expect little sense)", None
    if kind == "hub" and src in fd.HUB_MODELS:
        return f"OpenAI's GPT-2 ([{HUB_ORG}/{src}](https://huggingface.co/{HUB_ORG}/{src}))", f"{HUB_ORG}/{src}"
    if kind == "hub":
        return f"a GPT-2 in the Hugging Face layout ({os.path.basename(os.path.normpath(src))})", None
    if kind == "pretrained":
        path, _, step = src.partition(", ")
        return f"a GPT-2 pretrained with build-nanogpt ({os.path.basename(path)}{', ' + step if step else ''})", None
    return init_source, None


def fmt_loss(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def model_card(loaded, name, license, n_params, dtype):
    """The model card: Hub YAML header, what the model is, usage, training settings, val loss, credits."""
    ckpt, cfg = loaded.checkpoint, loaded.model.config
    finetuned = ckpt is not None
    start, base_model = describe_start(ckpt.get("init_source", "?")) if finetuned else (None, None)
    header = [f"license: {license}", "language:", "- en", "library_name: transformers", "pipeline_tag: text-generation"]
    header += [f"base_model: {base_model}"] if base_model else []
    header += ["datasets:", f"- {HF_DATASET}"] if finetuned else []
    header += ["tags:", "- gpt2", "- nanogpt"] + (["- instruction-tuning"] if finetuned else [])
    shape = f"{n_params / 1e6:.1f}M parameters: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, " \
            f"a context of {cfg.block_size} tokens; {dtype_name(dtype)} weights"
    lines = ["---", *header, "---", "", f"# {name}", ""]
    if finetuned:
        lines += [f"A GPT-2 ({shape}) fine-tuned to follow instructions on [Dolly-15k]"
                  f"(https://huggingface.co/datasets/{HF_DATASET}), starting from {start}. Exported from "
                  f"`{os.path.basename(loaded.path)}` (step {ckpt['step']}) with `model/export_hf.py`."]
    else:
        lines += [f"A GPT-2 ({shape}), exported from `{os.path.basename(os.path.normpath(loaded.path))}` with "
                  f"`model/export_hf.py`. It was not fine-tuned on instructions, so it follows the template below "
                  f"poorly."]
    why = ("the license of the Dolly-15k data it was fine-tuned on (CC BY-SA 3.0), whose share-alike terms may "
           "reach a model trained on it" if finetuned else "the license of the Dolly-15k data this project "
           "fine-tunes on")
    lines += ["", f"**License:** `{license}`. The exporter's default is {why}; GPT-2's own weights are under a "
                  f"modified MIT license. Which license applies is for whoever publishes the model to decide.", ""]
    lines += usage_section(name)
    if finetuned:
        lines += training_section(ckpt, loaded)
    lines += ["## Limitations", "",
              "A small language model: its answers can be wrong, made up or offensive, and it was not trained for "
              "safety. Check what it says before you rely on it.", "",
              "## Credits", "",
              "- The GPT-2 architecture and tokenizer: OpenAI, [Language Models are Unsupervised Multitask "
              "Learners](https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_"
              "learners.pdf) (2019).",
              "- The training code follows Andrej Karpathy's [nanoGPT](https://github.com/karpathy/nanoGPT) and "
              "[build-nanogpt](https://github.com/karpathy/build-nanogpt).",
              "- The data: [databricks-dolly-15k](https://huggingface.co/datasets/databricks/databricks-dolly-15k), "
              "(c) Databricks, Inc., CC BY-SA 3.0.", ""]
    return "\n".join(lines)


def usage_section(name):
    template = PROMPT_TEMPLATE.format(instruction="{instruction}")
    with_context = PROMPT_TEMPLATE_WITH_CONTEXT.format(instruction="{instruction}", context="{context}")
    return ["## Use", "",
            "The model answers one instruction, written in the template it was fine-tuned with; the tokenizer's "
            "chat template writes it for you from one user message. Generation is greedy by default "
            "(`generation_config.json`) and stops at `<|endoftext|>` or when the context is full "
            "(`max_new_tokens=N` stops it sooner).", "",
            "```python", "from transformers import pipeline", "",
            f"generator = pipeline(\"text-generation\", model=\"{name}\")  # this folder, or its Hub repo id",
            "messages = [{\"role\": \"user\", \"content\": \"Give me three tips for a job interview.\"}]",
            "out = generator(messages, do_sample=False)",
            "print(out[0][\"generated_text\"][-1][\"content\"])", "",
            "# with a context (Dolly's closed QA, summarization, information extraction)",
            "prompt = generator.tokenizer.apply_chat_template(",
            "    [{\"role\": \"user\", \"content\": \"Who wrote Hamlet?\"}], context=\"Hamlet is a tragedy by "
            "William Shakespeare.\",",
            "    add_generation_prompt=True, tokenize=False)",
            "print(generator(prompt, do_sample=False, return_full_text=False)[0][\"generated_text\"])",
            "```", "",
            "The prompt, without and with a context (the model writes its answer after `### Response:`):", "",
            "```", template.rstrip("\n"), "```", "", "```", with_context.rstrip("\n"), "```", "",
            "The chat template raises an error for several messages or a role other than `user`.", ""]


def training_section(ckpt, loaded):
    c = ckpt["config"]
    tokens = ckpt["step"] * c["total_batch_size"]
    data = describe_data(ckpt) or f"Dolly-15k as prepared in `{c['data_dir']}` (not found when this was exported)"
    rows = [("data", data), ("steps", f"{ckpt['step']} of {c['max_steps']} ({tokens:,} tokens)"),
            ("tokens per step", f"{c['total_batch_size']:,} (sequences of {c['sequence_length']} tokens)"),
            ("learning rate", f"{c['max_lr']:g} peak after {c['warmup_steps']} warmup step(s), cosine decay to "
                              f"{c['min_lr']:g}"),
            ("optimizer", f"AdamW, betas ({c['beta1']:g}, {c['beta2']:g}), weight decay {c['weight_decay']:g}, "
                          f"gradient clip {c['grad_clip']:g}"),
            ("loss on", "the response tokens and the end-of-text token after them" if c["loss_on"] == "response"
             else "every token"),
            ("processes", str(ckpt.get("world_size", 1))), ("seed", str(c["seed"]))]
    lines = ["## Training", "", "Fine-tuned with this project's `model/finetune_dolly.py`.", "",
             "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    before, after = run_metrics(loaded)
    val_on = f"the first {c['val_tokens']:,} tokens of " if c.get("val_tokens") else ""
    lines += ["## Evaluation", "", f"Cross-entropy on {val_on}the held-out val split of the data (the loss on the "
              "response tokens, as in training), by the training run. A loss computed on this export normalises "
              f"over its {VOCAB_SIZE:,} logits; the trainer's model may pad the vocabulary to 50,304, so yours can "
              "differ slightly.", ""]
    if after is None:
        lines += [f"Val loss at step {ckpt['step']}: {fmt_loss(ckpt.get('val_loss'))} (the run's metrics.jsonl was "
                  f"not next to the checkpoint, so no per-category figures).", ""]
        return lines
    lines += ["| | before fine-tuning (step 0) | after (step %d) |" % ckpt["step"], "|---|---|---|",
              f"| **all** | {fmt_loss(before and before['val_loss'])} | {fmt_loss(after['val_loss'])} |"]
    cats_before = (before or {}).get("val_loss_per_category") or {}
    for cat, loss in sorted((after.get("val_loss_per_category") or {}).items()):
        if loss is not None:
            lines.append(f"| {cat} | {fmt_loss(cats_before.get(cat))} | {fmt_loss(loss)} |")
    return lines + [""]


# -----------------------------------------------------------------------------
# writing: a staging folder next to --out_dir, renamed into place when complete


def json_text(obj):
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def check_out_dir(out_dir, force, checkpoint):
    """Refuses an --out_dir that holds files (unless --force) or that would take the checkpoint with it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise fd.UserError(f"--out_dir {out_dir} is a file; pass a folder name")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not force:
        raise fd.UserError(f"--out_dir {out_dir} exists and is not empty; pass --force to replace it, or another "
                           f"--out_dir")
    inside = os.path.commonpath([os.path.realpath(out_dir), os.path.realpath(checkpoint)]) == os.path.realpath(out_dir)
    holds_runs = any(fd.CHECKPOINT_RE.match(n) or n == fd.BEST_NAME for n in os.listdir(out_dir))
    if (inside and not fd.is_hub_source(checkpoint)) or holds_runs:
        raise fd.UserError(f"--out_dir {out_dir} holds fine-tune checkpoints; --force would delete them. Pick "
                           f"another --out_dir")


def missing_parents(path):
    """The folders above path that do not exist yet, outermost first."""
    missing, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.insert(0, parent)
        parent = os.path.dirname(parent)
    return missing


def publish(staging, out_dir, force):
    """Renames the complete staging folder to out_dir. An existing out_dir (with --force) is renamed aside first and
    deleted only once the new folder is in place (put back if that rename fails)."""
    old = None
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not force:  # filled while the export ran
            raise fd.UserError(f"--out_dir {out_dir} is no longer empty; pass --force to replace it")
        old = f"{out_dir}.old{os.getpid()}"
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)  # replaces an empty out_dir
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    fd.fsync_path(os.path.dirname(os.path.abspath(out_dir)))
    if old is not None:
        shutil.rmtree(old)


def write_export(staging, tensors, dtype, files, block_size):
    """Writes the text files, the weights and the tokenizer into staging and makes them durable. The disk takes the
    weights (fsync, in a thread: it releases the GIL) while the tokenizer is being built."""
    for name, text in files.items():
        write_text(os.path.join(staging, name), text)
    weights = os.path.join(staging, "model.safetensors")
    write_safetensors(tensors, dtype, weights)
    with ThreadPoolExecutor(1) as pool:
        flushed = pool.submit(fd.fsync_path, weights)
        write_tokenizer(staging, block_size)
        flushed.result()
    for name in os.listdir(staging):
        if name != "model.safetensors":
            fd.fsync_path(os.path.join(staging, name))
    fd.fsync_path(staging)


def export(checkpoint, out_dir, dtype="float32", license=DEFAULT_LICENSE, force=False):
    """The whole export; returns what was loaded (fd.LoadedModel). Raises UserError/DataError with nothing left
    behind: no staging folder, out_dir untouched."""
    out_dir = os.path.normpath(out_dir)
    check_out_dir(out_dir, force, checkpoint)
    loaded = fd.load_model(checkpoint, mapped=True)  # the model's weights are the mapped file's, not a copy
    torch_dtype = DTYPES[dtype]
    tensors = hf_tensors(loaded.model)
    config = loaded.model.config
    n_params = sum(t.numel() for t in tensors.values())
    name = os.path.basename(os.path.abspath(out_dir))
    files = {"config.json": json_text(hf_config(config, torch_dtype)),
             "generation_config.json": json_text(generation_config(config)),
             "README.md": model_card(loaded, name, license, n_params, torch_dtype)}
    created = missing_parents(out_dir)
    staging = f"{out_dir}.tmp{os.getpid()}"
    try:
        os.makedirs(staging)
        write_export(staging, tensors, torch_dtype, files, config.block_size)
        publish(staging, out_dir, force)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        if isinstance(e, OSError):
            raise fd.UserError(f"writing {out_dir} failed ({e.strerror or e}); nothing was changed there") from None
        raise
    return loaded


# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Export a GPT-2 fine-tuned on Dolly-15k to the Hugging Face layout.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="logs_finetune",
                   help="fine-tune checkpoint (model_NNNNN.pt, model_best.pt) or its log dir (model_best.pt, else the "
                        "newest model_NNNNN.pt), build-nanogpt checkpoint, Hub name (gpt2, ...) or Hugging Face folder")
    p.add_argument("--out_dir", required=True, help="the folder to write (refused if it exists and is not empty)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the exported weights")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help="license id for the model card's Hub header (the default is the Dolly data's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out_dir (kept until the new one is "
                                                         "complete)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", args.license):
        p.error(f"--license must be a Hub license id such as cc-by-sa-3.0, mit, apache-2.0 or other, got "
                f"{args.license!r}")
    return args


def main(argv=None):
    args = get_args(argv)
    return fd.run_tool(lambda: export_and_report(args))


def export_and_report(args):
    with redirect_stdout(sys.stderr):  # the loaders' notes go with the other diagnostics
        loaded = export(args.checkpoint, args.out_dir, args.dtype, args.license, args.force)
    print(f"exported {loaded.description} to {os.path.normpath(args.out_dir)}/ ({args.dtype}): "
          f"load it with transformers' pipeline(\"text-generation\", model=\"{os.path.normpath(args.out_dir)}\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
