"""
Tests of model/prepare_dolly.py: tokenizer, template, split, shards, re-runs and the errors users see.
Offline and CPU only, ~15 s. CLI behaviour (exit codes, stderr, files left behind) runs the script in a subprocess.
"""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

import prepare_dolly
from prepare_dolly import EOT, DataError, format_prompt, split_records, tokenize_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "model", "prepare_dolly.py")
EOT_TEXT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# helpers


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def record(i, category="open_qa", context="", response=None):
    return {"instruction": f"Question number {i}?", "context": context,
            "response": f"Answer number {i}." if response is None else response, "category": category}


def run_cli(*args, env=None, cwd=ROOT, timeout=120):
    """Runs prepare_dolly.py offline, with the datasets cache in a throwaway place unless env says otherwise."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, SCRIPT, "--quiet", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def read_dir(path):
    """{name: bytes} of every file in path (not recursive)."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                out[name] = f.read()
    return out


def load_manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def load_split(out_dir, manifest, split):
    """(tokens, mask, category) of a split, its shards concatenated in manifest order."""
    shards = manifest["splits"][split]["shards"]
    arrays = {kind: [np.load(os.path.join(out_dir, s[kind]), allow_pickle=False) for s in shards]
              for kind in ("tokens", "mask", "category")}
    dtypes = {"tokens": np.uint16, "mask": np.uint8, "category": np.uint8}
    return tuple(np.concatenate(arrays[kind]) if arrays[kind] else np.zeros(0, dtype) for kind, dtype in dtypes.items())


def assert_clean_failure(result, out_dir, *expected):
    """Exit status 1, one `error: ...` line on stderr that contains each expected string, no traceback, and no
    shards, manifest or staging directory left in out_dir."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    if os.path.isdir(out_dir):
        left = [n for n in os.listdir(out_dir) if n.startswith((".prepare-", "dolly_")) or n == "manifest.json"]
        assert left == [], left
    return errors[0]


@pytest.fixture(scope="module")
def enc():
    """The tokenizer from the bundled ranks, whether or not tiktoken could download them on this machine."""
    import tiktoken

    def no_download(name):
        raise ConnectionError("no internet in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiktoken, "get_encoding", no_download)
        yield prepare_dolly.get_tokenizer(verbose=False)


@pytest.fixture(scope="module")
def sample_records():
    """~150 distinct records of the bundled sample: real text, all eight categories, some with a context."""
    records, seen = [], set()
    for r in prepare_dolly.read_jsonl(prepare_dolly.BUNDLED_SAMPLE)[:150]:
        key = (r["instruction"].strip(), r["context"].strip(), r["response"].strip())
        if key not in seen:  # the sample repeats a few records, which prepare drops
            seen.add(key)
            records.append(r)
    assert len({r["category"] for r in records}) == 8 and any(r["context"] for r in records)
    return records


# -----------------------------------------------------------------------------
# tokenizer


def test_bundled_tokenizer_gives_gpt2_ids(enc):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("\n") == [198]
    assert enc.encode_ordinary("\n\n") == [628]
    assert enc.encode_ordinary("!") == [0]
    assert enc.encode(EOT_TEXT, allowed_special="all") == [EOT] == [50256]
    assert EOT not in enc.encode_ordinary(EOT_TEXT)  # user text that spells the EOT is ordinary text
    assert enc.n_vocab == 50257 == prepare_dolly.VOCAB_SIZE
    assert enc.eot_token == EOT


def test_bundled_tokenizer_round_trips_unicode(enc):
    text = "naïve café — 日本語, Ελληνικά, emoji 🙂👍🏽\n\tindented  spaces \u00a0nbsp {\"json\": [1, 2]}"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_bundled_tokenizer_matches_transformers_gpt2_when_cached(enc, sample_records):
    """A second reference, only where the Hugging Face GPT-2 tokenizer is in the local cache."""
    hub = pytest.importorskip("huggingface_hub")
    if not isinstance(hub.try_to_load_from_cache("gpt2", "vocab.json"), str):  # cheaper than importing transformers
        pytest.skip("no GPT-2 tokenizer in the local Hugging Face cache")
    transformers = pytest.importorskip("transformers")
    try:
        reference = transformers.GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
    except Exception as e:
        pytest.skip(f"no GPT-2 tokenizer in the local Hugging Face cache ({type(e).__name__})")
    if len(reference) != prepare_dolly.VOCAB_SIZE:  # transformers 5 returns an empty tokenizer offline, no error
        pytest.skip(f"no GPT-2 tokenizer in the local Hugging Face cache (got a vocabulary of {len(reference)})")
    for r in sample_records[:50]:
        text = format_prompt(r["instruction"], r["context"]) + r["response"]
        assert enc.encode_ordinary(text) == reference(text)["input_ids"]


def test_corrupt_rank_file_raises_data_error(tmp_path, monkeypatch):
    import tiktoken
    with open(prepare_dolly.BUNDLED_RANKS, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    token, rank = lines[1000].split()
    lines[1000] = token + b" " + str(int(rank) + 1).encode() + b"\n"  # one wrong rank, same size
    corrupt = tmp_path / "gpt2.tiktoken"
    corrupt.write_bytes(b"".join(lines))
    monkeypatch.setattr(prepare_dolly, "BUNDLED_RANKS", str(corrupt))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(DataError, match="sha256.*git checkout model/gpt2.tiktoken"):
        prepare_dolly.get_tokenizer(verbose=False)


def test_tokenizer_gives_up_on_a_download_that_hangs(monkeypatch, capsys):
    """tiktoken downloads without a timeout: on a network that drops packets get_encoding would hang every run. It is
    given TIKTOKEN_TIMEOUT seconds, then the bundled ranks are used, with one line saying so; while the abandoned
    call still hangs (holding tiktoken's lock), tiktoken is not asked again."""
    import threading
    import time
    import tiktoken
    release, calls = threading.Event(), []

    def hanging_download(name):
        calls.append(name)
        release.wait(30)
        raise ConnectionError("gave up")

    monkeypatch.setattr(tiktoken, "get_encoding", hanging_download)
    monkeypatch.setattr(prepare_dolly, "TIKTOKEN_TIMEOUT", 0.2)
    try:
        t = time.time()
        enc = prepare_dolly.get_tokenizer()
        assert time.time() - t < 5 and enc.encode_ordinary("Hello world") == [15496, 995]
        assert "(no answer in 0.2 s); using the bundled copy" in capsys.readouterr().out
        monkeypatch.setattr(prepare_dolly, "TIKTOKEN_TIMEOUT", 30)  # a second wait would be plain to see
        t = time.time()
        assert prepare_dolly.get_tokenizer(verbose=False).encode_ordinary("Hello") == [15496]
        assert time.time() - t < 10 and calls == ["gpt2"]  # the first call still hangs: no second wait
    finally:
        release.set()
        prepare_dolly._tiktoken_loader.join(5)


def test_tokenizer_is_tiktokens_own_when_it_loads(monkeypatch):
    """tiktoken stays the first choice: what get_encoding("gpt2") returns (from its cache or a download) is used."""
    import tiktoken
    sentinel = object()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel if name == "gpt2" else None)
    assert prepare_dolly.get_tokenizer(verbose=False) is sentinel


def test_hub_check_leaves_a_proxied_connection_to_the_hub_libraries(monkeypatch):
    """Behind an HTTPS proxy a direct connect fails although huggingface_hub (through the proxy) would work."""
    import socket

    def no_direct_route(*args, **kwargs):
        raise OSError("blocked")

    monkeypatch.setattr(socket, "create_connection", no_direct_route)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert prepare_dolly.hub_reachable() is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert prepare_dolly.hub_reachable() is True


def test_missing_rank_file_names_the_file_not_the_output_dir(tmp_path, monkeypatch):
    """Regression: a missing model/gpt2.tiktoken was reported as '--output_dir ...: writing failed'."""
    import tiktoken
    monkeypatch.setattr(prepare_dolly, "BUNDLED_RANKS", str(tmp_path / "gpt2.tiktoken"))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(DataError, match=r"gpt2\.tiktoken: cannot read .*git checkout"):
        prepare_dolly.get_tokenizer(verbose=False)


# -----------------------------------------------------------------------------
# template and examples


def test_format_prompt_exact_text():
    assert format_prompt("  Name a color. \n") == "### Instruction:\nName a color.\n\n### Response:\n"
    assert format_prompt("Summarize.", " Some text.\n") == \
        "### Instruction:\nSummarize.\n\n### Context:\nSome text.\n\n### Response:\n"
    assert format_prompt("Summarize.", " \n\t") == format_prompt("Summarize.")  # blank context = no context


@pytest.mark.parametrize("extra", [
    record(1),
    record(2, context="Paris is the capital of France.", response="  Paris.\n"),
    record(3, context="Ünïcödé «context» 日本", response="Réponse 🙂 with <|endoftext|> spelled out"),
])
def test_tokenize_example_round_trip_and_mask(enc, sample_records, extra):
    for r in [extra] + sample_records[:40]:
        before = copy.deepcopy(r)
        tokens, mask = tokenize_example(enc, r)
        assert r == before  # records are never modified (litgpt #1760)
        prompt, response = format_prompt(r["instruction"], r["context"]), r["response"].strip()
        tokens, mask = np.array(tokens), np.array(mask)
        assert len(tokens) == len(mask)
        assert enc.decode(tokens.tolist()) == prompt + response + EOT_TEXT
        assert enc.decode(tokens[mask == 1].tolist()) == response + EOT_TEXT
        assert enc.decode(tokens[mask == 0].tolist()) == prompt
        # the prompt is tokenized exactly as a chat front end tokenizes format_prompt(...) on its own
        assert tokens[mask == 0].tolist() == enc.encode_ordinary(prompt)
        assert np.all(np.diff(mask) >= 0) and mask[0] == 0 and mask[-1] == 1  # prompt, then response
        assert tokens[-1] == EOT and np.count_nonzero(tokens == EOT) == 1


@pytest.mark.parametrize("cpus", [{0}, {0, 1, 2}])
def test_encode_examples_equals_tokenize_example_on_one_or_more_threads(enc, sample_records, monkeypatch, cpus):
    """Groups of 256 records, each one text joined by the EOT special token, go to a thread pool (one thread per CPU
    this process may use, at most 8; none on a single CPU): the tokens and the (prompt, response + EOT) counts come
    back in record order and equal tokenize_example of each record, also for records whose prompt or response ends in
    whitespace, is a single character or spells <|endoftext|> (encoded alone, as ordinary text), at any place in a
    group."""
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    records = sample_records * 4
    odd = [record(1, response="ends in newlines\n\n"), record(2, response="x"),
           record(3, context="Réponse 🙂 with <|endoftext|> spelled out"), record(4, response="<|endoftext|>"),
           record("<|endoftext|>"), record(5, context=" <|endoftext|><|endoftext|> ")]
    records[100:100] = odd[:3]
    records[255:255] = odd[3:4]  # a record that is encoded alone, where a group of 256 would end
    records += odd[4:]
    assert len(records) > 2 * 256
    ids, lengths = prepare_dolly.encode_examples(enc, records, "test", progress=False)
    examples = [tokenize_example(enc, r) for r in records]
    assert ids.dtype == np.uint32 and lengths.shape == (len(records), 2)
    assert ids.tolist() == [t for tokens, _ in examples for t in tokens]
    assert lengths.tolist() == [[mask.count(0), mask.count(1)] for _, mask in examples]
    assert [len(a) for a in prepare_dolly.encode_examples(enc, [], "test", progress=False)] == [0, 0]


def test_records_hash_is_sha256_of_sorted_json_lines():
    records = [record(1), record(2, context='quotes " and \\ backslash', response="tab\tnew\nline\r\x01\x1f"),
               record(3, category="général", response="日本語 🙂 \u2028 \u00e9")]
    expected = hashlib.sha256("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
                              .encode("utf-8")).hexdigest()
    assert prepare_dolly.records_hash(records) == expected


# -----------------------------------------------------------------------------
# validation split


def make_split_records():
    sizes = {"brainstorming": 1, "classification": 2, "closed_qa": 3, "general_qa": 20, "open_qa": 200,
             "summarization": 57}
    return [record(f"{c}-{i}", category=c) for c, n in sizes.items() for i in range(n)], sizes


def test_split_is_disjoint_complete_and_leaves_input_alone():
    records, _ = make_split_records()
    before = copy.deepcopy(records)
    train, val = split_records(records, 0.1, seed=1337)
    assert records == before
    train_ids, val_ids = [r["instruction"] for r in train], [r["instruction"] for r in val]
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == sorted(r["instruction"] for r in records)
    assert len(set(train_ids)) == len(train_ids) and len(set(val_ids)) == len(val_ids)


def test_split_is_deterministic_per_seed():
    records, _ = make_split_records()
    assert split_records(records, 0.1, seed=1337) == split_records(list(records), 0.1, seed=1337)
    other_train, other_val = split_records(records, 0.1, seed=7)
    train, val = split_records(records, 0.1, seed=1337)
    assert {r["instruction"] for r in val} != {r["instruction"] for r in other_val}
    assert [r["instruction"] for r in train] != [r["instruction"] for r in other_train]


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.3])
def test_split_is_stratified_by_category(val_fraction):
    records, sizes = make_split_records()
    train, val = split_records(records, val_fraction, seed=1337)
    n_val, n_train = Counter(r["category"] for r in val), Counter(r["category"] for r in train)
    for category, n in sizes.items():
        if n >= 2:
            assert n_val[category] >= 1, category
            assert abs(n_val[category] - n * val_fraction) <= 1, (category, n_val[category], n * val_fraction)
        assert n_train[category] >= 1, category  # a single-record category stays in train


def test_split_keeps_every_category_in_train_at_a_large_val_fraction():
    """Regression: round(2 * 0.8) = 2 put both records of a category in val, leaving train without it."""
    records = [record(i, category="a") for i in range(2)] + [record(i, category="b") for i in range(1)]
    train, val = split_records(records, 0.8, seed=0)
    assert Counter(r["category"] for r in train) == {"a": 1, "b": 1}
    assert Counter(r["category"] for r in val) == {"a": 1}


def test_split_with_zero_val_fraction_keeps_everything_in_train():
    records, _ = make_split_records()
    train, val = split_records(records, 0.0, seed=1)
    assert val == [] and len(train) == len(records)


# -----------------------------------------------------------------------------
# shards and manifest (one CLI run of a small input, shared by the tests below)

SHARD_SIZE = 1000


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, sample_records):
    """150 sample records plus one whose response spells <|endoftext|>, in shards of 1000 tokens."""
    tmp = tmp_path_factory.mktemp("small_run")
    records = sample_records + [record("eot", category="open_qa", response=f"Text with {EOT_TEXT} inside it.")]
    path = write_jsonl(tmp / "small.jsonl", records)
    out_dir = str(tmp / "out")
    result = run_cli("--input", path, "--output_dir", out_dir, "--shard_size", SHARD_SIZE, "--val_fraction", 0.1)
    assert result.returncode == 0, result.stderr
    return {"records": records, "path": path, "out_dir": out_dir, "manifest": load_manifest(out_dir)}


def test_shards_have_exact_sizes_and_dtypes(small_run):
    out_dir, manifest = small_run["out_dir"], small_run["manifest"]
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert shards, split
        for i, shard in enumerate(shards):
            tokens, mask, category = (np.load(os.path.join(out_dir, shard[k]), allow_pickle=False)
                                      for k in ("tokens", "mask", "category"))
            assert tokens.dtype == np.uint16 and mask.dtype == np.uint8 and category.dtype == np.uint8
            assert len(tokens) == len(mask) == len(category) == shard["num_tokens"]
            if i < len(shards) - 1:
                assert shard["num_tokens"] == SHARD_SIZE
            else:
                assert 0 < shard["num_tokens"] <= SHARD_SIZE
        assert sum(s["num_tokens"] for s in shards) == manifest["splits"][split]["tokens"]
    assert len(manifest["splits"]["train"]["shards"]) > 3  # enough to cross several shard boundaries
    # exactly the listed shards and the manifest: no temp files, no staging directory
    listed = {s[kind] for split in ("train", "val") for s in manifest["splits"][split]["shards"]
              for kind in ("tokens", "mask", "category")}
    assert set(os.listdir(out_dir)) == listed | {"manifest.json"}


def test_shards_are_the_examples_back_to_back(small_run, enc):
    """Concatenated shards == tokenize_example over the records in split order: examples straddle shard
    boundaries intact, masks line up with tokens, and category ids index manifest['categories']."""
    out_dir, manifest, records = small_run["out_dir"], small_run["manifest"], small_run["records"]
    assert manifest["records_read"] == len(records)
    assert manifest["records_skipped_empty_response"] == manifest["records_skipped_duplicate"] == 0
    categories = manifest["categories"]
    assert categories == sorted({r["category"] for r in records})
    expected_splits = dict(zip(("train", "val"), split_records(records, manifest["val_fraction"], manifest["seed"])))
    for split, expected_records in expected_splits.items():
        tokens, mask, category = load_split(out_dir, manifest, split)
        examples = [tokenize_example(enc, r) for r in expected_records]
        assert tokens.tolist() == [t for example_tokens, _ in examples for t in example_tokens]
        assert mask.tolist() == [m for _, example_mask in examples for m in example_mask]
        assert category.tolist() == [categories.index(r["category"])
                                     for r, (t, _) in zip(expected_records, examples) for _ in t]
        stats = manifest["splits"][split]
        assert stats["records"] == len(expected_records)
        assert stats["tokens"] == len(tokens) and stats["response_tokens"] == int(mask.sum())
        assert np.count_nonzero(tokens == EOT) == len(expected_records)  # one EOT per example, none from the text
        assert stats["max_example_tokens"] == max(len(t) for t, _ in examples)
        counts = {c: int(np.count_nonzero(category == i)) for i, c in enumerate(categories) if np.any(category == i)}
        assert stats["tokens_per_category"] == dict(sorted(Counter(counts).items()))
        assert sum(stats["records_per_category"].values()) == len(expected_records)
    assert int(load_split(out_dir, manifest, "train")[0].max()) < prepare_dolly.VOCAB_SIZE


def test_manifest_describes_the_data(small_run):
    manifest = small_run["manifest"]
    assert manifest["format_version"] == prepare_dolly.MANIFEST_VERSION
    assert manifest["tokenizer"] == "gpt2" and manifest["vocab_size"] == 50257 and manifest["eot_token"] == EOT
    assert manifest["token_dtype"] == "uint16" and manifest["shard_size"] == SHARD_SIZE
    assert manifest["source"] == os.path.abspath(small_run["path"])
    assert manifest["source_sha256"] == prepare_dolly.records_hash(small_run["records"])
    assert manifest["template"]["prompt"] == prepare_dolly.PROMPT_TEMPLATE
    # one generation prompt per category that has a val record with a context that fits, each taken from val
    _, val = split_records(small_run["records"], manifest["val_fraction"], manifest["seed"])
    prompts = manifest["sample_prompts"]
    assert [p["category"] for p in prompts] == sorted({r["category"] for r in val if len(r["context"]) <= 1500})
    assert len(prompts) >= 6
    val_keys = {(r["instruction"], r["context"]) for r in val}
    assert all((p["instruction"], p["context"]) in val_keys for p in prompts)


def test_rerun_is_byte_identical(small_run, tmp_path):
    first = read_dir(small_run["out_dir"])
    again = tmp_path / "again"
    args = ("--input", small_run["path"], "--shard_size", SHARD_SIZE, "--val_fraction", 0.1)
    assert run_cli(*args, "--output_dir", again).returncode == 0
    assert read_dir(again) == first
    assert run_cli(*args, "--output_dir", again).returncode == 0  # into the same directory
    assert read_dir(again) == first


def test_rerun_removes_stale_shards_and_keeps_other_files(small_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(small_run["out_dir"], out_dir)  # an earlier run with many small shards
    shutil.copy(os.path.join(ROOT, "dolly15k", "README.md"), out_dir / "README.md")
    shutil.copy(prepare_dolly.BUNDLED_SAMPLE, out_dir / "dolly_sample.jsonl")
    (out_dir / "notes.txt").write_text("mine")
    keep = {name: data for name, data in read_dir(out_dir).items()
            if not name.startswith("dolly_") or name.endswith(".jsonl")}
    keep.pop("manifest.json")
    args = ("--input", small_run["path"], "--shard_size", 100_000, "--val_fraction", 0.1)
    result = run_cli(*args, "--output_dir", out_dir)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out_dir)
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "val")] == [1, 1]
    fresh = tmp_path / "fresh"
    assert run_cli(*args, "--output_dir", fresh).returncode == 0
    after = read_dir(out_dir)
    assert {n: after[n] for n in keep} == keep  # README, the bundled sample and the user's file untouched
    assert {n: d for n, d in after.items() if n not in keep} == read_dir(fresh)  # no stale shard left


def test_empty_responses_and_duplicates_are_skipped_and_counted(tmp_path, enc, monkeypatch):
    records = [record(1), record(2, response=""), record(3, response="  \n "), record(1),
               record(4, category="closed_qa")]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    monkeypatch.setattr(prepare_dolly, "get_tokenizer", lambda verbose=True: enc)
    assert prepare_dolly.main(["--input", path, "--output_dir", str(tmp_path / "out"), "--quiet"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["records_read"] == 5
    assert manifest["records_skipped_empty_response"] == 2 and manifest["records_skipped_duplicate"] == 1
    assert manifest["splits"]["train"]["records"] + manifest["splits"]["val"]["records"] == 2
    assert manifest["source_sha256"] == prepare_dolly.records_hash(records)  # of the input as read


def test_zero_val_fraction_writes_an_empty_val_split(small_run, tmp_path, enc, monkeypatch):
    monkeypatch.setattr(prepare_dolly, "get_tokenizer", lambda verbose=True: enc)
    out_dir = tmp_path / "out"
    args = ["--input", small_run["path"], "--output_dir", str(out_dir), "--val_fraction", "0", "--quiet"]
    assert prepare_dolly.main(args) == 0
    manifest = load_manifest(out_dir)
    assert manifest["splits"]["val"]["records"] == manifest["splits"]["val"]["tokens"] == 0
    assert manifest["splits"]["val"]["shards"] == [] and manifest["sample_prompts"] == []
    assert manifest["splits"]["train"]["records"] == len(small_run["records"])
    before = small_run["manifest"]["splits"]
    assert manifest["splits"]["train"]["tokens"] == sum(before[s]["tokens"] for s in ("train", "val"))


def test_json_list_and_parquet_inputs_match_jsonl(small_run, tmp_path):
    records = small_run["records"]
    as_json = tmp_path / "dolly.json"
    as_json.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    as_parquet = tmp_path / "dolly.parquet"
    import datasets
    datasets.Dataset.from_list(records).to_parquet(str(as_parquet))
    expected = {n: d for n, d in read_dir(small_run["out_dir"]).items() if n != "manifest.json"}
    for path in (as_json, as_parquet):
        out_dir = tmp_path / f"out_{path.suffix[1:]}"
        result = run_cli("--input", path, "--output_dir", out_dir, "--shard_size", SHARD_SIZE, "--val_fraction", 0.1,
                         env={"HF_HOME": str(tmp_path / "hf")})
        assert result.returncode == 0, result.stderr
        manifest = load_manifest(out_dir)
        assert manifest["source"] == str(path)
        assert manifest["source_sha256"] == small_run["manifest"]["source_sha256"]
        assert {n: d for n, d in read_dir(out_dir).items() if n != "manifest.json"} == expected


def test_offline_default_uses_bundled_sample(tmp_path):
    """No --input and no Hub: the bundled sample, with a warning that says how to get the full set."""
    t0 = time.time()
    result = run_cli("--output_dir", tmp_path / "out", env={"HF_HOME": str(tmp_path / "hf")})
    seconds = time.time() - t0
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stdout and "bundled sample" in result.stdout and "--input PATH" in result.stdout
    manifest = load_manifest(tmp_path / "out")
    assert manifest["source"] == "bundled:dolly15k/dolly_sample.jsonl"
    assert manifest["records_read"] == 3105
    assert manifest["splits"]["train"]["tokens"] > 200_000 and manifest["splits"]["val"]["tokens"] > 0
    assert seconds < 30, f"offline fallback took {seconds:.0f}s"


def test_manifest_is_utf8_whatever_the_locale(tmp_path):
    """Regression: manifest.json was written in the locale's encoding, so an ASCII locale crashed on 'général'."""
    path = write_jsonl(tmp_path / "in.jsonl", [record(1, category="général"), record(2, category="général"), record(3)])
    env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"}
    result = run_cli("--input", path, "--output_dir", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert load_manifest(tmp_path / "out")["categories"] == ["général", "open_qa"]


# -----------------------------------------------------------------------------
# bad inputs: exit 1, one `error:` line, nothing half-written


def test_missing_input_file(tmp_path):
    out_dir = tmp_path / "out"
    assert_clean_failure(run_cli("--input", tmp_path / "nope.jsonl", "--output_dir", out_dir), out_dir,
                         "nope.jsonl", "no such file")


@pytest.mark.parametrize("lines, expected", [
    ([json.dumps(record(1)), json.dumps(record(2)), '{"instruction": "broken', json.dumps(record(4))],
     [":3: malformed JSON"]),
    ([json.dumps(record(1)), json.dumps({k: v for k, v in record(2).items() if k != "category"})],
     [":2: missing field 'category'"]),
    ([json.dumps({**record(1), "context": None})], [":1: field 'context' must be a string"]),
    (["[1, 2]"], [":1: expected a JSON object"]),
    ([], ["no usable records"]),
    ([json.dumps(record(1, response="")), json.dumps(record(2, response=" \n"))],
     ["no usable records", "2 with an empty response"]),
    # regression: half a surrogate pair (valid JSON) crashed records_hash with a UnicodeEncodeError traceback
    ([json.dumps(record(1)), '{"instruction": "Hi \\ud83d", "context": "", "response": "x", "category": "a"}'],
     [":2: field 'instruction' holds an unpaired surrogate"]),
], ids=["malformed_json", "missing_field", "null_field", "not_an_object", "empty_file", "all_empty_responses",
        "lone_surrogate"])
def test_bad_jsonl_fails_cleanly(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out_dir = tmp_path / "out"
    result = run_cli("--input", path, "--output_dir", out_dir)
    error = assert_clean_failure(result, out_dir, *expected)
    assert result.stderr.count("\n") == 1, result.stderr  # the error line and nothing else
    if expected[0].startswith(":"):
        assert f"{path}{expected[0].split(' ')[0]}" in error  # names file:line


def test_not_utf8_input_fails_cleanly(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(record(1, response="café"), ensure_ascii=False).encode("latin-1") + b"\n")
    out_dir = tmp_path / "out"
    assert_clean_failure(run_cli("--input", path, "--output_dir", out_dir), out_dir, "not UTF-8")


def test_corrupt_parquet_fails_cleanly(tmp_path):
    """Regression: pyarrow's ArrowInvalid reached the user as a traceback."""
    path = tmp_path / "dolly.parquet"
    path.write_text("not parquet")
    out_dir = tmp_path / "out"
    assert_clean_failure(run_cli("--input", path, "--output_dir", out_dir, env={"HF_HOME": str(tmp_path / "hf")}),
                         out_dir, "not a readable Parquet file")


def test_unwritable_output_dir_fails_cleanly(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [record(1), record(2)])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out_dir = blocker / "out"  # root ignores chmod, but nothing can be created under a regular file
    assert_clean_failure(run_cli("--input", path, "--output_dir", out_dir), out_dir, "--output_dir", "cannot write")
    assert blocker.read_text() == "not a directory"


def test_failed_run_leaves_earlier_output_untouched(small_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(small_run["out_dir"], out_dir)
    before = read_dir(out_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record(1)) + "\n{oops\n", encoding="utf-8")
    result = run_cli("--input", bad, "--output_dir", out_dir)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {bad}:2: malformed JSON")
    assert read_dir(out_dir) == before and not [n for n in os.listdir(out_dir) if n.startswith(".prepare-")]


@pytest.mark.parametrize("args, expected", [
    (["--val_fraction", "1"], "--val_fraction must be in [0, 1)"),
    (["--val_fraction", "-0.1"], "--val_fraction must be in [0, 1)"),
    (["--shard_size", "0"], "--shard_size must be positive"),
])
def test_bad_arguments_exit_2(tmp_path, args, expected):
    result = run_cli("--output_dir", tmp_path / "out", *args)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_json_list_with_bom_and_leading_whitespace(tmp_path):
    """A JSON list saved by an editor that writes a byte-order mark and a newline first is still a list."""
    import json as _json
    records = [{"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
               {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"}]
    path = tmp_path / "dolly.json"
    path.write_bytes(b"\xef\xbb\xbf\n  " + _json.dumps(records).encode())
    import prepare_dolly
    assert prepare_dolly.read_local(str(path)) == records
