"""
Tokenize the Databricks Dolly-15k instruction dataset into uint16 shards for finetune_dolly.py.

Source: https://huggingface.co/datasets/databricks/databricks-dolly-15k
License: CC BY-SA 3.0, (c) 2023 Databricks, Inc.; some categories quote Wikipedia (CC BY-SA 3.0).
Fields: instruction, context (may be empty), response, category (8 categories).

Each record becomes one example, rendered with the prompt template below and ended by <|endoftext|>:

    ### Instruction:
    {instruction}

    ### Context:            <- only when the record has a context
    {context}

    ### Response:
    {response}<|endoftext|>

Output in --output_dir (default dolly15k/):
    dolly_{split}_{k:06d}.npy           uint16 GPT-2 token ids, examples packed back to back
    dolly_{split}_mask_{k:06d}.npy      uint8, 1 where the token is response text or its closing EOT
    dolly_{split}_category_{k:06d}.npy  uint8, index into manifest["categories"] for every token
    manifest.json                       source hash, template, counts, tokenizer, shard list with sha256s

Run:
    python model/prepare_dolly.py                        # Hub, else the bundled sample (offline)
    python model/prepare_dolly.py --input dolly.jsonl    # a local copy of databricks-dolly-15k.jsonl
"""

import argparse
import base64
import hashlib
import io
import json
import operator
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np

# -----------------------------------------------------------------------------
# constants

HF_DATASET = "databricks/databricks-dolly-15k"
HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_SAMPLE = os.path.join(HERE, "..", "dolly15k", "dolly_sample.jsonl")
BUNDLED_RANKS = os.path.join(HERE, "gpt2.tiktoken")
TIKTOKEN_TIMEOUT = 15.0  # seconds for tiktoken to load the GPT-2 encoding (it downloads ~1.5 MB unless cached)
# sha256 of tiktoken's r50k_base.tiktoken, whose ranks are those of the "gpt2" encoding
BUNDLED_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257
SHARD_SIZE = 10_000_000  # tokens per shard, as the user's guide says for instruction data
MANIFEST_VERSION = 1
FIELDS = ("instruction", "context", "response", "category")

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_CONTEXT = "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"


class DataError(Exception):
    """A problem with the user's input or output location; main() prints it as one line."""


# -----------------------------------------------------------------------------
# template and tokenizer (imported by finetune_dolly.py and chat.py)

def format_prompt(instruction, context=""):
    """The text the model sees before the response. The response follows it directly."""
    instruction, context = instruction.strip(), context.strip()
    if context:
        return PROMPT_TEMPLATE_WITH_CONTEXT.format(instruction=instruction, context=context)
    return PROMPT_TEMPLATE.format(instruction=instruction)


_tiktoken_loader = None  # the thread of the last tiktoken.get_encoding("gpt2") call (see get_tokenizer)


def get_tokenizer(verbose=True):
    """tiktoken's GPT-2 encoding (from tiktoken's cache, or downloaded); when that fails or gives no answer within
    TIKTOKEN_TIMEOUT seconds, the same ranks from model/gpt2.tiktoken."""
    global _tiktoken_loader
    import tiktoken
    result = {}

    def load():
        try:
            result["encoding"] = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no internet (compute nodes, CI): tiktoken raises a requests error
            result["error"] = e

    # In a thread that is given up on after the timeout: tiktoken's download has none, so a network that drops
    # packets would hang every run. While an abandoned call still hangs, it holds tiktoken's lock: not asked again.
    if _tiktoken_loader is None or not _tiktoken_loader.is_alive():
        _tiktoken_loader = threading.Thread(target=load, daemon=True)
        _tiktoken_loader.start()
        _tiktoken_loader.join(TIKTOKEN_TIMEOUT)
    if "encoding" in result:
        return result["encoding"]
    reason = type(result["error"]).__name__ if "error" in result else f"no answer in {TIKTOKEN_TIMEOUT:g} s"
    ranks = bundled_ranks()
    from tiktoken_ext.openai_public import r50k_pat_str
    if verbose:
        print(f"tiktoken could not download the GPT-2 ranks ({reason}); using the bundled copy "
              f"{os.path.relpath(BUNDLED_RANKS)}")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=VOCAB_SIZE)


def bundled_ranks():
    """{token bytes: rank} of GPT-2's BPE from model/gpt2.tiktoken, checked against its sha256."""
    try:
        with open(BUNDLED_RANKS, "rb") as f:
            data = f.read()
    except OSError as e:  # not left to prepare(), which would blame --output_dir
        raise DataError(f"{BUNDLED_RANKS}: cannot read ({e.strerror}); restore it with "
                        f"`git checkout model/gpt2.tiktoken`")
    if hashlib.sha256(data).hexdigest() != BUNDLED_RANKS_SHA256:
        raise DataError(f"{BUNDLED_RANKS} is corrupt (sha256 mismatch); restore it with "
                        f"`git checkout model/gpt2.tiktoken`")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def format_example(record):
    """Returns (prompt, response) text of one record; the example is prompt + response + <|endoftext|>."""
    return format_prompt(record["instruction"], record["context"]), record["response"].strip()


def tokenize_example(enc, record):
    """Returns (tokens, mask) of one record: mask is 1 on the response tokens and the closing EOT."""
    prompt_text, response_text = format_example(record)
    prompt = enc.encode_ordinary(prompt_text)
    response = enc.encode_ordinary(response_text) + [EOT]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


# -----------------------------------------------------------------------------
# reading the records

def check_record(record, where):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise DataError(f"{where}: missing field '{field}' (Dolly records need {', '.join(FIELDS)}); fix or "
                            f"remove that record")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
        if not record[field].isascii():  # JSON may escape half a surrogate pair, which no UTF-8 file can hold
            try:
                record[field].encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: field '{field}' holds an unpaired surrogate {record[field][e.start]!r} "
                                f"(a broken emoji or non-BMP character); fix that record")
    return {field: record[field] for field in FIELDS}  # a copy: the input is never modified


def read_jsonl(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix that line or re-download the file")
            records.append(check_record(record, f"{path}:{lineno}"))
    return records


def read_local(path):
    """Reads the original JSONL (or a JSON list, or Parquet through `datasets`)."""
    if not os.path.isfile(path):
        raise DataError(f"--input {path}: no such file; pass the path of databricks-dolly-15k.jsonl")
    try:
        if path.endswith(".parquet"):
            import datasets
            try:
                rows = datasets.Dataset.from_parquet(path)
            except Exception as e:  # pyarrow's ArrowInvalid and friends are no OSError
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                raise DataError(f"{path}: not a readable Parquet file ({reason}); "
                                f"pass the original JSONL file")
            return [check_record(r, f"{path}:row {i + 1}") for i, r in enumerate(rows)]
        if path.endswith(".json"):
            with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the JSON
                head = f.read(4096).lstrip()[:1]
            if head == "[":
                with open(path, encoding="utf-8-sig") as f:
                    try:
                        rows = json.load(f)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file or re-download it")
                return [check_record(r, f"{path}:record {i + 1}") for i, r in enumerate(rows)]
        return read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); pass the original JSONL file")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")


def hub_reachable(timeout=5.0):
    """A quick check, so that offline machines skip `datasets`' minute of retries. Behind an HTTPS proxy (which a
    direct connection would not pass) the Hub libraries are left to try it themselves."""
    if urllib.request.getproxies().get("https"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_records(input_path):
    """Returns (records, source description)."""
    if input_path:
        return read_local(input_path), os.path.abspath(input_path)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    reason = "the Hugging Face Hub is unreachable"
    if offline or hub_reachable():  # offline mode still finds a copy in the local datasets cache
        try:
            import datasets
            rows = datasets.load_dataset(HF_DATASET, split="train")
            return [check_record(r, f"{HF_DATASET} row {i + 1}") for i, r in enumerate(rows)], f"hf:{HF_DATASET}"
        except DataError:
            raise
        except Exception as e:
            reason = f"loading {HF_DATASET} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    try:
        records = read_jsonl(BUNDLED_SAMPLE)
    except OSError as e:  # not left to prepare(), which would blame --output_dir
        raise DataError(f"{reason}, and the bundled sample {BUNDLED_SAMPLE} cannot be read ({e.strerror}); "
                        f"restore it with `git checkout dolly15k/dolly_sample.jsonl`, or pass --input PATH")
    bar = "!" * 100
    print(f"{bar}\nWARNING: {reason}; using the bundled sample {os.path.relpath(BUNDLED_SAMPLE)}: "
          f"{len(records)} of Dolly-15k's 15,011 records.\nFor the full set, run this on a machine with "
          f"internet, or download databricks-dolly-15k.jsonl and pass --input PATH.\n{bar}")
    return records, "bundled:dolly15k/dolly_sample.jsonl"


# -----------------------------------------------------------------------------
# split and shards

def split_records(records, val_fraction, seed):
    """Deterministic validation split by record, stratified by category. Returns (train, val)."""
    by_category = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record)
    rng = random.Random(seed)
    train, val = [], []
    for category in sorted(by_category):
        group = by_category[category][:]
        rng.shuffle(group)
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(group) >= 2:
            n_val = 1  # every category with two or more records gets a val example
        n_val = min(n_val, len(group) - 1)  # ... and keeps at least one in train, so train is never empty
        val += group[:n_val]
        train += group[n_val:]
    rng.shuffle(train)  # mix categories in the training stream
    rng.shuffle(val)
    return train, val


def shard_name(split, kind, index):
    kind = "" if kind == "tokens" else f"{kind}_"
    return f"dolly_{split}_{kind}{index:06d}.npy"


def save_npy(path, array):
    """Writes array as an .npy file (durably: prepare() publishes its staging folder with renames) and returns the
    file's sha256, which manifest.json keeps so that the trainer can tell a damaged shard before training on it."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def encode_examples(enc, records, desc, progress):
    """The tokens of tokenize_example(enc, record) for all records, back to back (uint32), and each example's
    (prompt, response + EOT) token counts, as an (n, 2) array; the same tokens as tokenize_example record by record,
    with far fewer calls into tiktoken.
    Records go to tiktoken 256 at a time as one text, prompt<|endoftext|>response<|endoftext|>..., with <|endoftext|>
    allowed as the special token: tiktoken encodes the text between special tokens on its own, so each EOT marks the
    end of a prompt or of an example, and dropping the EOTs after the prompts leaves the examples exactly. Such long
    calls let go of the GIL for long, so the groups run on a few threads (none on a single CPU). A record whose text
    spells <|endoftext|> itself is encoded on its own, by tokenize_example."""
    from tqdm import tqdm
    threads = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    texts = [format_example(record) for record in records]
    groups, joinable = [], []  # lists of record indices: runs of at most 256 joinable records, or one that spells EOT
    for i, (prompt, response) in enumerate(texts):
        if EOT_TEXT in prompt or EOT_TEXT in response:
            groups += [joinable, [i]] if joinable else [[i]]
            joinable = []
        else:
            joinable.append(i)
            if len(joinable) == 256:
                groups.append(joinable)
                joinable = []
    groups += [joinable] if joinable else []

    def encode_group(group):
        if len(group) == 1 and EOT_TEXT in texts[group[0]][0] + texts[group[0]][1]:
            tokens, mask = tokenize_example(enc, records[group[0]])
            return np.array(tokens, dtype=np.uint32), np.array([[mask.count(0), mask.count(1)]], dtype=np.int64)
        text = "".join(prompt + EOT_TEXT + response + EOT_TEXT for prompt, response in (texts[i] for i in group))
        ids = enc.encode_to_numpy(text, allowed_special={EOT_TEXT}, disallowed_special=())
        ends = np.flatnonzero(ids == EOT)
        assert len(ends) == 2 * len(group)
        prompt_ends, example_ends = ends[0::2], ends[1::2]
        starts = np.concatenate(([0], example_ends[:-1] + 1))
        return np.delete(ids, prompt_ends), np.stack([prompt_ends - starts, example_ends - prompt_ends], axis=1)

    ids, lengths = [np.zeros(0, np.uint32)], [np.zeros((0, 2), np.int64)]
    with tqdm(total=len(records), desc=desc, unit="example", disable=not progress, leave=False) as bar, \
            ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        encoded = pool.map(encode_group, groups) if pool else map(encode_group, groups)
        for group, (group_ids, group_lengths) in zip(groups, encoded):
            ids.append(group_ids)
            lengths.append(group_lengths)
            bar.update(len(group))
    return np.concatenate(ids), np.concatenate(lengths)


def write_split(enc, split, records, category_ids, shard_size, out_dir, progress):
    """Tokenizes records into shards of exactly shard_size tokens (the last one shorter).
    Examples are packed back to back and may straddle a shard boundary, like build-nanogpt's fineweb.py.
    The split stays in memory (Dolly-15k: ~3M tokens, 12 MB as uint32)."""
    ids, lengths = encode_examples(enc, records, f"tokenizing {split}", progress)
    example_lengths = lengths.sum(axis=1)
    example_categories = np.array([category_ids[r["category"]] for r in records], dtype=np.uint8)
    arrays = {"tokens": ids.astype(np.uint16),
              "mask": np.repeat(np.tile(np.array([0, 1], dtype=np.uint8), len(records)), lengths.ravel()),
              "category": np.repeat(example_categories, example_lengths)}
    n_tokens = len(arrays["tokens"])
    records_per_category = Counter(r["category"] for r in records)
    tokens_per_category = np.bincount(example_categories, weights=example_lengths, minlength=len(category_ids))
    stats = {"records": len(records), "tokens": n_tokens, "response_tokens": int(lengths[:, 1].sum()),
             "max_example_tokens": int(example_lengths.max(initial=0)),
             "tokens_per_category": {c: int(tokens_per_category[category_ids[c]])
                                     for c in sorted(records_per_category)},
             "records_per_category": dict(sorted(records_per_category.items())),
             "mean_example_tokens": round(n_tokens / max(1, len(records)), 2)}
    shards = []
    for start in range(0, n_tokens, shard_size):
        names = {kind: shard_name(split, kind, len(shards)) for kind in arrays}
        sha256 = {kind: save_npy(os.path.join(out_dir, name), arrays[kind][start:start + shard_size])
                  for kind, name in names.items()}
        shards.append({"tokens": names["tokens"], "mask": names["mask"], "category": names["category"],
                       "num_tokens": min(shard_size, n_tokens - start), "sha256": sha256})
    return shards, stats


def sample_prompts(val_records):
    """One fixed validation instruction per category, for the trainer's generation samples."""
    chosen = {}
    for record in val_records:
        best = chosen.get(record["category"])
        key = (len(record["instruction"]) + len(record["context"]), record["instruction"])
        if len(record["context"]) <= 1500 and (best is None or key < best[0]):
            chosen[record["category"]] = (key, record)
    return [{"category": c, "instruction": r["instruction"], "context": r["context"], "response": r["response"]}
            for c, (_, r) in sorted(chosen.items())]


def records_hash(records):
    """sha256 of the records as JSON lines: json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n" each."""
    # Records hold exactly the string FIELDS (check_record), so each line is a fixed template filled with json's
    # own string escaping: the same bytes as json.dumps, without building an encoder per call as json.dumps does.
    template = "{" + ", ".join(f'"{field}": %s' for field in sorted(FIELDS)) + "}\n"
    values = operator.itemgetter(*sorted(FIELDS))
    text = "".join([template % tuple(map(json.encoder.encode_basestring, values(record))) for record in records])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -----------------------------------------------------------------------------

def prepare(args):
    t0 = time.time()
    out_dir = args.output_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
    except OSError as e:
        raise DataError(f"--output_dir {out_dir}: cannot write there ({e.strerror}); choose a writable directory")
    try:
        records, source = load_records(args.input)
        n_read = len(records)
        kept, seen = [], set()
        n_empty = n_duplicate = 0
        for record in records:
            if not record["response"].strip():
                n_empty += 1
                continue
            key = (record["instruction"].strip(), record["context"].strip(), record["response"].strip())
            if key in seen:  # an exact repeat would otherwise land in both splits
                n_duplicate += 1
                continue
            seen.add(key)
            kept.append(record)
        if not kept:
            where = args.input or source
            raise DataError(f"{where}: no usable records ({n_read} read, {n_empty} with an empty response); pass a "
                            f"Dolly-15k file")
        categories = sorted({r["category"] for r in kept})
        if len(categories) > 255:
            raise DataError(f"{len(categories)} distinct categories; at most 255 fit the uint8 category shards")
        category_ids = {c: i for i, c in enumerate(categories)}
        train, val = split_records(kept, args.val_fraction, args.seed)

        enc = get_tokenizer()
        progress = sys.stderr.isatty() and not args.quiet
        splits = {}
        for split, recs in (("train", train), ("val", val)):
            shards, stats = write_split(enc, split, recs, category_ids, args.shard_size, staging, progress)
            splits[split] = {**stats, "shards": shards}
        manifest = {
            "format_version": MANIFEST_VERSION,
            "source": source,
            "source_sha256": records_hash(records),
            "records_read": n_read,
            "records_skipped_empty_response": n_empty,
            "records_skipped_duplicate": n_duplicate,
            "tokenizer": "gpt2",
            "vocab_size": VOCAB_SIZE,
            "eot_token": EOT,
            "token_dtype": "uint16",
            "template": {"prompt": PROMPT_TEMPLATE, "prompt_with_context": PROMPT_TEMPLATE_WITH_CONTEXT,
                         "example": "prompt + response + <|endoftext|>"},
            "val_fraction": args.val_fraction,
            "seed": args.seed,
            "shard_size": args.shard_size,
            "categories": categories,
            "splits": splits,
            "sample_prompts": sample_prompts(val),
        }
        with open(os.path.join(staging, "manifest.json"), "w", encoding="utf-8") as f:  # not the locale's
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        # Publish: shards first, manifest last, then drop shards of an earlier run that the manifest does not list.
        new_files = sorted(os.listdir(staging))
        for name in new_files:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        for name in os.listdir(out_dir):
            if name.startswith("dolly_") and name.endswith(".npy") and name not in new_files:
                os.remove(os.path.join(out_dir, name))
    except OSError as e:
        raise DataError(f"--output_dir {out_dir}: writing failed ({e.strerror}); nothing was changed there")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, time.time() - t0


def print_summary(manifest, seconds, out_dir):
    print(f"source: {manifest['source']} ({manifest['records_read']} records read, "
          f"{manifest['records_skipped_empty_response']} skipped for an empty response, "
          f"{manifest['records_skipped_duplicate']} exact duplicates skipped)")
    for split in ("train", "val"):
        s = manifest["splits"][split]
        print(f"{split:5s}: {s['records']:6d} records {s['tokens']:10,d} tokens ({s['response_tokens']:,d} response) "
              f"in {len(s['shards'])} shard(s); example length max {s['max_example_tokens']} "
              f"mean {s['mean_example_tokens']}")
    print("tokens per category (train + val):")
    for c in manifest["categories"]:
        n = sum(manifest["splits"][sp]["tokens_per_category"].get(c, 0) for sp in ("train", "val"))
        r = sum(manifest["splits"][sp]["records_per_category"].get(c, 0) for sp in ("train", "val"))
        print(f"  {c:24s} {r:6d} records {n:10,d} tokens")
    print(f"wrote {out_dir}/manifest.json in {seconds:.1f}s")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Tokenize Dolly-15k into GPT-2 token shards for model/finetune_dolly.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", default=None, help="local Dolly file (.jsonl, .json or .parquet; original schema). "
                   f"Default: {HF_DATASET} from the Hub, or the bundled sample when offline")
    p.add_argument("--output_dir", default="dolly15k", help="where shards and manifest.json are written")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of records per category held out for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the validation split and the training order")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.shard_size < 1:
        p.error(f"--shard_size must be positive, got {args.shard_size}")
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        manifest, seconds = prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(manifest, seconds, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
