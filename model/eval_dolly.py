"""
Did the fine-tune work? Answers to the held-out (val) instructions of the prepared Dolly data, scored, for one or
more models side by side: typically the model a run started from against what the run made of it.

Per model, overall and per Dolly category (each cell with its number of examples):
    val_loss       the trainer's val loss (fd.evaluate: packed examples, the run's own batch settings), so it equals
                   the val loss in the run's metrics.jsonl at that step
    loss           each example's mean response loss, scored on its own (its prompt as the only context), averaged
                   over the examples
    rouge_l        ROUGE-L F1 (rouge-score's rougeL, with stemming) of the greedy answer against the reference
    stop %         share of answers that end with <|endoftext|> within --max_new_tokens; answers cut at the model's
                   block size (cut) and prompts that do not fit it (skipped) are counted apart, not as failures
    answer_tokens  mean answer length in tokens; empty %: share of empty answers

Run (from the repo root, after model/prepare_dolly.py and a fine-tune):
    python model/eval_dolly.py --checkpoint start:logs_quickstart --checkpoint logs_quickstart   # before vs after
    python model/eval_dolly.py --checkpoint start:logs_finetune --checkpoint logs_finetune --max_examples 400
    python model/eval_dolly.py --checkpoint logs_finetune/model_00004.pt --checkpoint gpt2 --device cuda

A --checkpoint is what model/chat.py takes (a fine-tune checkpoint; a log dir, meaning its model_best.pt, else its
newest loadable model_NNNNN.pt; a build-nanogpt checkpoint; a Hub name; a Hugging Face folder), or start:RUN with
RUN a fine-tune checkpoint or log dir: the model that run started from (its pretrained model loaded again, or its
seeded random init rebuilt).
Output: the tables on stdout; eval.md (tables + one example per category) and eval.json (all figures, every answer)
in --out_dir, by default eval/ inside the log dir of the first fine-tune checkpoint named (eval_out/ if none is).
Exit status: 0 done; 1 error (one line says what to do); 2 bad command line.
"""

import argparse
import json
import os
import re
import sys
import textwrap
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

import finetune_dolly as fd
from prepare_dolly import EOT, get_tokenizer

# -----------------------------------------------------------------------------
# settings

START_PREFIX = "start:"  # --checkpoint start:RUN: the model the fine-tune RUN started from
DEFAULT_OUT_DIR = "eval_out"  # when no --checkpoint is a fine-tune run to write beside
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the checkpoints' names in the tables
MD_TEXT_CHARS = 400  # eval.md's example table shows at most this much of each text
ROUGE_HINT = "pip install rouge-score==0.1.2 (or pip install -r requirements.txt)"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Score models on the held-out Dolly instructions (see the docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a model (repeat for several, compared with the first): fine-tune checkpoint or its log dir, "
                        "build-nanogpt checkpoint, Hub name, Hugging Face folder, or start:RUN (the model the "
                        "fine-tune RUN, a checkpoint or log dir, started from)")
    p.add_argument("--data_dir", default="dolly15k", help="shards and manifest.json from model/prepare_dolly.py")
    p.add_argument("--max_examples", type=int, default=0,
                   help="score the first N val examples in a category-balanced order (0 = the whole val split)")
    p.add_argument("--max_new_tokens", type=int, default=fd.MAX_NEW_TOKENS, help="most tokens per answer")
    p.add_argument("--batch_size", type=int, default=16, help="prompts generated (and examples scored) together")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast where supported, else fp32), float32, bfloat16")
    p.add_argument("--out_dir", default=None, help="where eval.md and eval.json go (default: eval/ in the log dir of "
                                                   f"the first fine-tune checkpoint, else {DEFAULT_OUT_DIR}/)")
    return p.parse_args(argv)


def validate_args(args):
    """Every problem with the flag values at once, as one UserError."""
    problems = []
    if args.max_examples < 0:
        problems.append(f"--max_examples must be >= 0 (0 = the whole val split), got {args.max_examples}")
    if args.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {args.batch_size}")
    if not (args.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", args.device)):
        problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    if len(args.checkpoint) > len(LABELS):
        problems.append(f"at most {len(LABELS)} --checkpoint per run, got {len(args.checkpoint)}")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}")
    if problems:
        raise fd.UserError("; ".join(problems))


def rouge_scorer():
    """rouge-score's ROUGE-L scorer (a declared dependency); a UserError with the install line when it is missing."""
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise fd.UserError(f"the rouge-score package is missing; {ROUGE_HINT}") from None
    return rs.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(scorer, reference, answer):
    """ROUGE-L F1 of answer against reference: 1.0 for the same words, 0.0 for none in common."""
    return scorer.score(reference, answer)["rougeL"].fmeasure


# -----------------------------------------------------------------------------
# the models: what each --checkpoint names, and the val loss settings that go with it

@dataclass
class Candidate:
    """One --checkpoint, loaded (on the CPU until its turn)."""
    spec: str  # as given on the command line
    label: str  # A, B, C, ... in the tables
    model: fd.GPT
    description: str
    path: str  # the file, folder or Hub name the weights came from
    step: int | None  # the fine-tune step (0 for start:RUN), None for a model that was never fine-tuned
    run_dir: str | None  # the folder of the fine-tune run it belongs to, if any
    val_settings: dict  # batch_size, sequence_length, val_tokens, loss_on for fd.evaluate, and where they came from
    fingerprint: str | None = None  # data_fingerprint of a fine-tune checkpoint's data


def val_settings(checkpoint_meta, block_size):
    """The settings the trainer computed its val loss with: a fine-tune checkpoint's own; else the trainer's
    defaults (sequence length capped at the model's block size)."""
    saved = (checkpoint_meta or {}).get("config") or {}
    keys = ("batch_size", "sequence_length", "val_tokens", "loss_on")
    if all(k in saved for k in keys):
        return {**{k: saved[k] for k in keys}, "from": "checkpoint"}
    defaults = fd.TrainConfig()
    return {"batch_size": defaults.batch_size, "sequence_length": min(defaults.sequence_length, block_size),
            "val_tokens": defaults.val_tokens, "loss_on": defaults.loss_on, "from": "trainer defaults"}


def finetune_meta(spec):
    """(path, checkpoint) of the fine-tune run spec names (a checkpoint file or a log dir), for start:RUN."""
    if os.path.isdir(spec) and not fd.is_hub_source(spec):
        return fd.pick_checkpoint(spec)
    if not os.path.isfile(spec):
        raise fd.UserError(f"--checkpoint {START_PREFIX}{spec}: {spec} is no file or folder here; start: takes a "
                           f"fine-tune checkpoint or log dir (e.g. {START_PREFIX}logs_finetune)")
    try:
        return spec, fd.load_checkpoint(spec, mmap=True)
    except fd.UserError as e:
        if "not a full fine-tune checkpoint" in str(e):
            raise fd.UserError(f"--checkpoint {START_PREFIX}{spec}: {spec} is not a fine-tune checkpoint, so it names "
                               f"no run to take the start of; pass it without {START_PREFIX} to score it") from None
        raise


def load_candidate(spec, label):
    """The model a --checkpoint names. Raises UserError for anything that cannot be scored."""
    if spec.startswith(START_PREFIX):
        run = spec[len(START_PREFIX):]
        if not run:
            raise fd.UserError(f"--checkpoint {spec}: name the run after start:, e.g. {START_PREFIX}logs_finetune")
        path, ckpt = finetune_meta(run)
        model, source = fd.start_model(ckpt, path)
        fd.check_finite(model, source)
        return Candidate(spec, label, model, source, path, 0, os.path.dirname(path) or ".",
                         val_settings(ckpt, model.config.block_size))
    loaded = fd.load_model(spec)
    meta = loaded.checkpoint
    return Candidate(spec, label, loaded.model, loaded.description, loaded.path,
                     meta["step"] if meta else None, (os.path.dirname(loaded.path) or ".") if meta else None,
                     val_settings(meta, loaded.model.config.block_size), meta and meta.get("data_fingerprint"))


def default_out_dir(candidates):
    """eval/ in the run folder of the first fine-tune checkpoint (beside its samples.md), else DEFAULT_OUT_DIR."""
    runs = [c.run_dir for c in candidates if c.run_dir is not None]
    return os.path.join(runs[0], "eval") if runs else DEFAULT_OUT_DIR


# -----------------------------------------------------------------------------
# the examples: the val split's records, read back from the shards

@dataclass
class Example:
    category: str
    tokens: list  # prompt + response + EOT, as in the shards
    prompt_len: int  # tokens of the prompt (the mask-0 part)
    prompt: str  # the rendered prompt text (format_prompt)
    reference: str  # the response text, without its closing EOT

    @property
    def prompt_tokens(self):
        return self.tokens[:self.prompt_len]


def split_prompt(prompt, manifest):
    """(instruction, context) of a prompt rendered with the manifest's template, for display."""
    head, tail = manifest["template"]["prompt"].split("{instruction}")
    inner = prompt[len(head):len(prompt) - len(tail)] if prompt.startswith(head) and prompt.endswith(tail) else prompt
    with_context = manifest["template"]["prompt_with_context"]
    separator = with_context[with_context.index("{instruction}") + len("{instruction}"):with_context.index("{context}")]
    instruction, _, context = inner.partition(separator)
    return instruction, context


def read_examples(data_dir, manifest, enc):
    """The val split's examples in shard order. An example is a run of mask-0 tokens (the prompt) followed by a
    run of mask-1 tokens (the response and its closing EOT): a new one starts at each 1 -> 0 step of the mask."""
    if manifest["splits"]["val"]["tokens"] == 0:
        raise fd.UserError(f"{data_dir}/ has an empty val split, so nothing is held out to score; re-run "
                           f"`python model/prepare_dolly.py` with --val_fraction > 0")
    stream = fd.TokenStream(data_dir, "val", manifest)
    tokens, mask, cats = stream.read(0, stream.num_tokens)
    starts = np.concatenate(([0], np.flatnonzero((mask[:-1] == 1) & (mask[1:] == 0)) + 1, [len(tokens)]))
    categories, examples = manifest["categories"], []
    for s, e in zip(starts[:-1], starts[1:]):
        m = mask[s:e]
        prompt_len = int(np.argmax(m == 1))
        well_formed = m[0] == 0 and m[-1] == 1 and np.all(m[prompt_len:] == 1) and tokens[e - 1] == EOT \
            and np.all(cats[s:e] == cats[s]) and cats[s] < len(categories)
        if not well_formed:
            raise fd.UserError(f"{data_dir}/: the val shards do not hold whole examples at token {s}; re-run "
                               f"`python model/prepare_dolly.py`")
        ids = tokens[s:e].astype(np.int64).tolist()
        examples.append(Example(categories[cats[s]], ids, prompt_len, enc.decode(ids[:prompt_len]),
                                enc.decode(ids[prompt_len:-1])))
    expected = manifest["splits"]["val"].get("records")
    if expected is not None and expected != len(examples):
        raise fd.UserError(f"{data_dir}/: the val shards hold {len(examples)} examples, manifest.json says {expected}; "
                           f"re-run `python model/prepare_dolly.py`")
    return examples


def balanced_order(examples, categories):
    """Indices of examples, round robin over categories (in the manifest's order): the first example of each
    category, then the second of each, ...; so the first N are as balanced over the categories as the split allows."""
    queues = [[i for i, ex in enumerate(examples) if ex.category == c] for c in categories]
    order = []
    for k in range(max(map(len, queues), default=0)):
        order += [q[k] for q in queues if k < len(q)]
    return order


# -----------------------------------------------------------------------------
# scoring one model: val loss, each example's loss, greedy answers

def val_loss(candidate, data_dir, manifest, device, autocast):
    """(overall, {category: loss or None}) as the trainer computes it at an eval step (fd.evaluate)."""
    cfg = SimpleNamespace(**{k: v for k, v in candidate.val_settings.items() if k != "from"})
    stream = fd.TokenStream(data_dir, "val", manifest)
    overall, per_category = fd.evaluate(candidate.model, stream, cfg, 0, 1, device, autocast,
                                        len(manifest["categories"]))
    return overall, dict(zip(manifest["categories"], per_category))


def fits(example, block_size):
    """A prompt fits when the model has room for at least one answer token after it (as chat.py and the trainer's
    samples require)."""
    return example.prompt_len < block_size


@torch.no_grad()
def example_losses(model, examples, batch_size, device, autocast):
    """Each example's mean loss over its response tokens and closing EOT, with its own prompt as the only context
    (None for a prompt that does not fit; a long response is scored as far as the block size reaches). Examples of
    similar length are batched together, right-padded; causal attention never lets a row see its padding."""
    block_size = model.config.block_size
    order = sorted((i for i, ex in enumerate(examples) if fits(ex, block_size)), key=lambda i: -len(examples[i].tokens))
    losses = [None] * len(examples)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        seqs = [examples[i].tokens[:block_size + 1] for i in chunk]
        T = max(len(q) for q in seqs) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), fd.IGNORE_INDEX, dtype=torch.long)
        for row, (i, seq) in enumerate(zip(chunk, seqs)):
            x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[row, examples[i].prompt_len - 1:len(seq) - 1] = torch.tensor(seq[examples[i].prompt_len:])
        positions, targets = fd.target_positions(y)
        with autocast:
            h = model.hidden_states(x.to(device)).flatten(0, 1).index_select(0, positions.to(device))  # (N, C)
            row_losses = fd.target_cross_entropy(h, model.lm_head.weight, targets.to(device), "none")
        rows = positions // T
        sums = torch.bincount(rows, weights=row_losses.double().cpu(), minlength=len(chunk))
        counts = torch.bincount(rows, minlength=len(chunk))
        for row, i in enumerate(chunk):
            losses[i] = (sums[row] / counts[row]).item()
    return losses


def generate_answers(model, prompts, max_new_tokens, batch_size, autocast=nullcontext(), progress=None):
    """Greedy answers (token ids, without the EOT) to prompts (lists of ids that fit the model), with fd's batched
    KV-cache generation. Prompts go longest first in batches of similar length, so little padding is computed and
    the slowest batch comes first (the ETA errs long). progress(n): called after each batch with its size."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    answers = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        out = fd.generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, temperature=0, autocast=autocast)
        for i, tokens in zip(chunk, out):
            answers[i] = tokens
        if progress is not None:
            progress(len(chunk))
    return answers


def score_candidate(candidate, examples, args, manifest, device, autocast, enc, scorer):
    """Scores one model on the chosen examples. Returns ((val loss, {category: val loss}), per-example scores:
    why the answer stopped ('skipped' for a prompt that does not fit), loss, ROUGE-L, length, emptiness, text)."""
    from tqdm import tqdm
    model = candidate.model.to(device)
    block_size = model.config.block_size
    overall_val, per_category_val = val_loss(candidate, args.data_dir, manifest, device, autocast)
    losses = example_losses(model, examples, args.batch_size, device, autocast)
    fit = [i for i, ex in enumerate(examples) if fits(ex, block_size)]
    t0 = time.time()
    with tqdm(total=len(fit), desc=f"{candidate.label} answers", unit="answer", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        answers = generate_answers(model, [examples[i].prompt_tokens for i in fit], args.max_new_tokens,
                                   args.batch_size, autocast, bar.update)
    seconds = time.time() - t0
    scores = [{"stop": "skipped", "loss": None, "rouge_l": None, "answer_tokens": None, "empty": None}
              for _ in examples]
    for i, tokens in zip(fit, answers):
        text = enc.decode(tokens).strip()
        scores[i] = {"stop": fd.stop_reason(examples[i].prompt_len, len(tokens), args.max_new_tokens, block_size),
                     "loss": losses[i], "rouge_l": rouge_l(scorer, examples[i].reference, text),
                     "answer_tokens": len(tokens), "empty": not text, "answer": text}
    candidate.model.to("cpu")
    n_tokens = sum(len(a) for a in answers)
    print(f"{candidate.label}: {len(fit)} answers, {n_tokens:,} tokens in {seconds:.1f} s "
          f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s)", file=sys.stderr)
    return (overall_val, per_category_val), scores


# -----------------------------------------------------------------------------
# summaries: the cells of the tables

def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(scores, val):
    """One table cell from per-example scores and its val loss: the means over the examples that fit the model;
    stop_rate over those not cut at the block size."""
    scored = [s for s in scores if s["stop"] != "skipped"]
    cut = sum(s["stop"] == "block_size" for s in scored)
    judged = len(scored) - cut
    return {"val_loss": val, "loss": mean([s["loss"] for s in scored]),
            "rouge_l": mean([s["rouge_l"] for s in scored]),
            "stop_rate": sum(s["stop"] == "eot" for s in scored) / judged if judged else None,
            "answer_tokens": mean([s["answer_tokens"] for s in scored]),
            "empty": mean([float(s["empty"]) for s in scored]),
            "examples": len(scored), "cut": cut, "skipped": len(scores) - len(scored)}


# -----------------------------------------------------------------------------
# output: the tables (stdout and eval.md), eval.json

COLUMNS = (("n", "examples"), ("val_loss", "val_loss"), ("loss", "loss"), ("rouge_l", "rouge_l"),
           ("stop %", "stop_rate"), ("answer_tokens", "answer_tokens"), ("empty %", "empty"), ("cut", "cut"),
           ("skipped", "skipped"))
COUNTS = ("examples", "cut", "skipped")


def fmt(key, value, diff=False):
    """A cell's text; shares as percent (a difference in percentage points)."""
    if value is None:
        return "-"
    sign = "+" if diff else ""
    if key in COUNTS:
        return str(value)
    if key in ("val_loss", "loss"):
        return f"{value:{sign}.4f}"
    if key == "rouge_l":
        return f"{value:{sign}.3f}"
    if key in ("stop_rate", "empty"):
        return f"{100 * value:{sign}.1f}"
    return f"{value:{sign}.1f}"


def table_rows(result, base=None):
    """Rows (lists of strings) of one checkpoint's table, or of its difference from base (counts are its own)."""
    rows = []
    cells = [("overall", result["overall"])] + list(result["per_category"].items())
    for name, cell in cells:
        row = [name]
        for _, key in COLUMNS:
            if base is None or key in COUNTS:
                row.append(fmt(key, cell[key]))
            else:
                other = base["overall"] if name == "overall" else base["per_category"][name]
                both = cell[key] is not None and other[key] is not None
                row.append(fmt(key, cell[key] - other[key] if both else None, diff=True))
        rows.append(row)
    return rows


def tables(results):
    """[(title, rows)]: each checkpoint's table, then each later one's difference from the first."""
    out = [(f"{r['label']} = {r['checkpoint']}", table_rows(r)) for r in results]
    out += [(f"{r['label']} - {results[0]['label']} (difference)", table_rows(r, results[0])) for r in results[1:]]
    return out


def render_text(rows):
    header = ["category"] + [name for name, _ in COLUMNS]
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    return "\n".join(lines)


def md_cell(text, limit=None):
    """text as one table cell: shortened to limit characters, Markdown and HTML characters escaped, lines as <br>."""
    if limit is not None and len(text) > limit:
        text = text[:limit].rstrip() + " …"
    text = re.sub(r"([\\|*_`\[\]#])", r"\\\1", text).replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\n", "<br>") or " "


def render_md(rows):
    header = ["category"] + [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def legend(results):
    return [f"{r['label']} = {r['checkpoint']}: {r['description']}" for r in results]


def settings_line(settings):
    return (f"{settings['examples']} of the {settings['val_examples']} val examples of {settings['data_dir']}/, "
            f"greedy answers of at most {settings['max_new_tokens']} tokens, {settings['dtype']} on "
            f"{settings['device']}")


def column_notes():
    return ("n: examples scored; val_loss: the trainer's (packed, token-weighted, over the val split or the run's "
            "val_tokens); loss: mean over examples of each one's response loss, scored alone; rouge_l: ROUGE-L F1 "
            "against the one reference; stop %: answers ending with <|endoftext|> (of those not cut); cut: answers "
            "cut at the model's block size; skipped: prompts that do not fit it")


def render_markdown(report):
    results, settings = report["checkpoints"], report["settings"]
    md = ["# Evaluation on the held-out Dolly instructions", "", settings_line(settings) + ".", ""]
    md += [f"- {line}" for line in legend(results)] + [""]
    for title, rows in tables(results):
        md += [f"### {title}", "", render_md(rows), ""]
    md += [f"_{column_notes()}._", ""]
    if settings["notes"]:
        md += ["Notes:", ""] + [f"- {n}" for n in settings["notes"]] + [""]
    md += ["## One example per category", "",
           "| category | instruction | reference | " + " | ".join(r["label"] for r in results) + " |",
           "|---|---|---|" + "---|" * len(results)]
    shown = set()
    for ex in report["examples"]:
        if ex["category"] in shown:
            continue
        shown.add(ex["category"])
        instruction = ex["instruction"] + (f"\n\nContext: {ex['context']}" if ex["context"] else "")
        answers = [md_cell(a, MD_TEXT_CHARS) if a is not None else "_(prompt does not fit)_" for a in ex["answers"]]
        md.append(f"| {ex['category']} | {md_cell(instruction, MD_TEXT_CHARS)} | "
                  f"{md_cell(ex['reference'], MD_TEXT_CHARS)} | " + " | ".join(answers) + " |")
    return "\n".join(md) + "\n"


def render_stdout(report):
    results, settings = report["checkpoints"], report["settings"]
    out = [settings_line(settings)] + legend(results)
    for title, rows in tables(results):
        out += ["", title, render_text(rows)]
    out += [""] + textwrap.wrap(column_notes(), 118)
    for note in settings["notes"]:
        out += textwrap.wrap(f"note: {note}", 118, subsequent_indent="  ")
    return "\n".join(out)


def write_outputs(out_dir, report):
    """eval.json and eval.md, each written whole or not at all (fd.atomic_write_text)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        fd.atomic_write_text(os.path.join(out_dir, "eval.json"), text)
        fd.atomic_write_text(os.path.join(out_dir, "eval.md"), render_markdown(report))
    except OSError as e:
        raise fd.UserError(f"--out_dir {out_dir}: cannot write there ({e.strerror}); pass another --out_dir") from None


# -----------------------------------------------------------------------------
# the evaluation: inputs checked, each model scored, the report

def input_notes(args, examples, chosen, candidates, manifest):
    """What the reader of the tables must know about the selection and the models, found before any scoring."""
    notes = []
    if args.max_examples > len(examples):
        notes.append(f"--max_examples {args.max_examples} is more than the val split's {len(examples)} examples: all "
                     f"{len(examples)} are scored")
    fingerprint = fd.data_fingerprint(manifest)
    for c in candidates:
        if c.fingerprint is not None and c.fingerprint != fingerprint:
            notes.append(f"{c.label} ({c.spec}) was fine-tuned on other data (fingerprint {c.fingerprint}) than "
                         f"{args.data_dir}/ holds ({fingerprint}): its \"held-out\" examples may have been trained on")
        if c.val_settings["from"] != "checkpoint":
            s = c.val_settings
            notes.append(f"{c.label} is no fine-tune checkpoint: its val_loss uses the trainer's defaults (batch_size "
                         f"{s['batch_size']}, sequence_length {s['sequence_length']}, loss_on {s['loss_on']}, "
                         f"the whole val split)")
    for category in manifest["categories"]:
        if not any(ex.category == category for ex in chosen):
            why = "the val split has none" if not any(ex.category == category for ex in examples) else \
                "none among the first --max_examples"
            notes.append(f"{category}: no examples ({why}); its cells are empty")
    return notes


def cut_note(result, max_new_tokens):
    """A note when most answers were cut at the block size, where stop % says little."""
    cell = result["overall"]
    if cell["cut"] and 2 * cell["cut"] >= cell["examples"]:
        return (f"{result['label']}: {cell['cut']} of {cell['examples']} answers were cut at the model's "
                f"{result['block_size']}-token context before --max_new_tokens {max_new_tokens}; stop % counts only "
                f"the others (a smaller --max_new_tokens, e.g. {result['block_size'] // 2}, counts more)")
    return None


def checkpoint_result(candidate, scores, val, chosen, categories):
    """A checkpoint's entry in eval.json: what it is, and its cells overall and per category."""
    overall_val, per_category_val = val
    return {"checkpoint": candidate.spec, "label": candidate.label, "description": candidate.description,
            "path": candidate.path, "step": candidate.step, "block_size": candidate.model.config.block_size,
            "data_fingerprint": candidate.fingerprint, "val_loss_settings": candidate.val_settings,
            "overall": summarize(scores, overall_val),
            "per_category": {cat: summarize([s for s, ex in zip(scores, chosen) if ex.category == cat],
                                            per_category_val[cat]) for cat in categories}}


def example_entries(chosen, per_example, manifest):
    """eval.json's examples: each with every checkpoint's answer (None where its prompt did not fit) and scores."""
    entries = []
    for i, ex in enumerate(chosen):
        instruction, context = split_prompt(ex.prompt, manifest)
        entries.append({"category": ex.category, "instruction": instruction, "context": context, "prompt": ex.prompt,
                        "reference": ex.reference, "prompt_tokens": ex.prompt_len,
                        "answers": [scores[i].get("answer") for scores in per_example],
                        "scores": [{k: v for k, v in scores[i].items() if k != "answer"} for scores in per_example]})
    return entries


def evaluate_models(args):
    """Loads, scores and compares the models; returns (report, out_dir). What can be wrong with the input is found
    before the first model is scored: all models are loaded (on the CPU) first."""
    validate_args(args)
    scorer = rouge_scorer()
    device = fd.pick_device(args.device)
    dtype, autocast = fd.pick_autocast(device.split(":")[0], args.dtype)
    manifest = fd.load_manifest(args.data_dir)
    enc = get_tokenizer(verbose=False)
    examples = read_examples(args.data_dir, manifest, enc)
    categories = manifest["categories"]
    order = balanced_order(examples, categories)
    chosen = [examples[i] for i in (order[:args.max_examples] if args.max_examples else order)]
    candidates = [load_candidate(spec, label) for spec, label in zip(args.checkpoint, LABELS)]
    notes = input_notes(args, examples, chosen, candidates, manifest)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    results, per_example = [], []
    for c in candidates:
        print(f"{c.label}: {c.description}", file=sys.stderr)
        val, scores = score_candidate(c, chosen, args, manifest, device, autocast, enc, scorer)
        per_example.append(scores)
        results.append(checkpoint_result(c, scores, val, chosen, categories))
        notes += [note] if (note := cut_note(results[-1], args.max_new_tokens)) else []
    settings = {"data_dir": args.data_dir, "data_fingerprint": fd.data_fingerprint(manifest),
                "source": manifest["source"], "max_examples": args.max_examples, "examples": len(chosen),
                "val_examples": len(examples), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "device": device, "dtype": dtype, "decoding": "greedy", "categories": categories, "notes": notes}
    report = {"settings": settings, "checkpoints": results, "examples": example_entries(chosen, per_example, manifest)}
    return report, args.out_dir or default_out_dir(candidates)


def main(argv=None):
    args = get_args(argv)
    return fd.run_tool(lambda: evaluate_and_report(args))


def evaluate_and_report(args):
    with redirect_stdout(sys.stderr):  # the loaders' notes and warnings stay out of the table on stdout
        report, out_dir = evaluate_models(args)
    write_outputs(out_dir, report)
    print(render_stdout(report))
    print(f"\nwrote {os.path.join(out_dir, 'eval.md')} and eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
