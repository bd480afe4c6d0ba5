"""model/export_hf.py, with transformers as the oracle: the export of (a) a tiny random model, (b) a build-nanogpt
checkpoint and (c) a short fine-tune loads as GPT2LMHeadModel without a weight warning and gives our logits; its
tokenizer gives tiktoken's ids; its chat template is format_prompt; greedy generate() is chat.py --temperature 0;
exporting twice gives the same bytes; bad input is one line and leaves nothing; the trainer starts from an export.
CPU, tiny models, no downloads; the fine-tune and the exports are shared by the whole module."""

import json
import logging
import os
import subprocess
import warnings
from contextlib import contextmanager
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
import tokenizers  # noqa: E402  (a dependency of transformers, and of the export)

import chat  # noqa: E402
import export_hf  # noqa: E402
import finetune_dolly as fd  # noqa: E402
from conftest import NANOGPT_CONFIG, PYTHON, ROOT, run_trainer, write_nanogpt_checkpoints  # noqa: E402
from prepare_dolly import EOT, EOT_TEXT, VOCAB_SIZE, format_prompt, get_tokenizer  # noqa: E402

SAMPLE = os.path.join(ROOT, "dolly15k", "dolly_sample.jsonl")
NEW_TOKENS = 64

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer(verbose=False)


@pytest.fixture(scope="module")
def records():
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_dir):
    """What the exports are made from: (a) a bare state dict of a random model with large weights (so a missed
    transpose shows), (b) a build-nanogpt checkpoint, (c) the log dir of a 6-step fine-tune (block 256: room for
    a prompt and 64 new tokens)."""
    base = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = fd.GPT(fd.GPTConfig(block_size=64, vocab_size=VOCAB_SIZE, n_layer=2, n_head=1, n_embd=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.2)
    torch.save(model.state_dict(), base / "random.pt")  # a bare state dict: n_head = n_embd // 64 = 1
    torch.manual_seed(5)
    write_nanogpt_checkpoints(fd.GPT(fd.GPTConfig(**NANOGPT_CONFIG)).state_dict(), base)  # as a compiled model saves
    r = run_trainer(data_dir, base / "run", "--block_size", "256")
    assert r.returncode == 0, r.stderr
    return {"random": str(base / "random.pt"), "nanogpt": str(base / "_orig_mod.pt"), "finetuned": str(base / "run")}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    """{name: (export dir, fd.LoadedModel of the source)}. The fine-tune goes through the CLI with its log dir."""
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for name in ("random", "nanogpt"):
        out[name] = (str(base / name), export_hf.export(sources[name], str(base / name)))
    r = subprocess.run([PYTHON, os.path.join(ROOT, "model", "export_hf.py"), "--checkpoint", sources["finetuned"],
                        "--out_dir", str(base / "finetuned")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"exported {os.path.join(sources['finetuned'], 'model_best.pt')}")  # the log-dir rule
    out["finetuned"] = (str(base / "finetuned"), fd.load_model(sources["finetuned"]))
    return out


@contextmanager
def transformers_warnings():
    """Collects what transformers logs at WARNING or above, and Python warnings, inside the block."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        logger.removeHandler(handler)


def load_hf(path):
    """The export as transformers loads it; asserts nothing was missing, unexpected or warned about."""
    with transformers_warnings() as (logged, caught):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not any(info.values()), info
    assert not logged and not caught, [r.getMessage() for r in logged] + [str(w.message) for w in caught]
    return model.eval()


def real_ids(enc, records, n):
    """n token ids of real Dolly text, as in training (format_prompt + response + <|endoftext|>)."""
    ids = []
    for r in records:
        ids += enc.encode_ordinary(format_prompt(r["instruction"], r["context"]) + r["response"].strip()) + [EOT]
        if len(ids) >= n:
            return torch.tensor([ids[:n]])


# -----------------------------------------------------------------------------
# 1. the weights: transformers loads them as GPT2LMHeadModel and gives our logits


@pytest.mark.parametrize("name", ["random", "nanogpt", "finetuned"])
def test_transformers_gives_our_logits(exports, enc, records, name):
    path, loaded = exports[name]
    hf = load_hf(path)
    ids = real_ids(enc, records, loaded.model.config.block_size)
    with torch.no_grad():
        ours, _ = loaded.model(ids)
        theirs = hf(ids).logits
    assert theirs.shape[-1] == VOCAB_SIZE and ours.shape[-1] == (50304 if name != "random" else VOCAB_SIZE)
    assert ours.abs().max() > 0.05  # the comparison below means something
    assert (theirs - ours[..., :VOCAB_SIZE]).abs().max().item() <= 1e-4


def test_a_missing_tensor_is_caught(exports, tmp_path):
    """The check in load_hf can fail: drop one tensor and transformers reports it."""
    from safetensors.torch import load_file, save_file
    path, _ = exports["random"]
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(path, name), "rb").read())
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="ln_f.bias"):
        load_hf(str(tmp_path))


def test_safetensors_layout(exports):
    from safetensors import safe_open
    path, loaded = exports["nanogpt"]
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()
        assert f.get_slice("transformer.wte.weight").get_shape() == [VOCAB_SIZE, 16]
        fc = f.get_tensor("transformer.h.1.mlp.c_fc.weight")
    assert fc.shape == (16, 64)  # Conv1D: (in, out)
    assert torch.equal(fc, loaded.model.transformer.h[1].mlp.c_fc.weight.t())


def test_config_reads_back_as_transformers_writes_it(exports, tmp_path):
    path, _ = exports["finetuned"]
    with open(os.path.join(path, "config.json")) as f:
        ours = json.load(f)
    assert (ours["n_positions"], ours["n_ctx"], ours["vocab_size"], ours["dtype"]) == (256, 256, VOCAB_SIZE, "float32")
    transformers.AutoConfig.from_pretrained(path).save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        resaved = json.load(f)
    resaved.pop("transformers_version")
    assert resaved == {k: v for k, v in ours.items() if k != "torch_dtype"}  # torch_dtype: read as dtype
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": EOT, "do_sample": False, "eos_token_id": EOT, "max_length": 256,
                                "pad_token_id": EOT}


def test_bfloat16_export(exports, sources, tmp_path):
    out = str(tmp_path / "bf16")
    assert export_hf.main(["--checkpoint", sources["nanogpt"], "--out_dir", out, "--dtype", "bfloat16"]) == 0
    hf = load_hf(out)
    assert hf.dtype == torch.bfloat16
    ours = exports["nanogpt"][1].model.transformer.wpe.weight
    assert torch.equal(hf.transformer.wpe.weight, ours.to(torch.bfloat16))


def test_a_vocabulary_smaller_than_gpt2s_is_a_user_error():
    model = fd.GPT(fd.GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(fd.UserError, match="100 token embeddings, fewer than GPT-2's 50,257"):
        export_hf.hf_tensors(model)


def test_float16_overflow_is_a_user_error(tmp_path):
    model = fd.GPT(fd.GPTConfig(block_size=8, vocab_size=VOCAB_SIZE, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.wpe.weight[0, 0] = 1e6
    with pytest.raises(fd.UserError, match="transformer.wpe.weight holds values beyond float16's range"):
        export_hf.write_safetensors(export_hf.hf_tensors(model), torch.float16, str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_weights_file_is_what_safetensors_writes(dtype, tmp_path):
    """write_safetensors, which lays out the transposed views chunk by chunk, writes save_file's bytes."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = fd.GPT(fd.GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=24))
    tensors = export_hf.hf_tensors(model)
    assert any(not t.is_contiguous() for t in tensors.values())  # the Conv1D transposes
    save_file({k: t.to(dtype).contiguous() for k, t in tensors.items()}, str(tmp_path / "theirs"),
              metadata={"format": "pt"})
    for chunk_bytes in (64, 2 ** 21):  # rows wider than a chunk (a buffer of the widest row), one chunk
        export_hf.write_safetensors(tensors, dtype, str(tmp_path / "ours"), chunk_bytes)
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    for name, t in {"every_other": torch.arange(10.0)[::2], "slice": torch.randn(6, 9)[::2, ::3]}.items():
        save_file({name: t.to(dtype).contiguous()}, str(tmp_path / "theirs"), metadata={"format": "pt"})
        export_hf.write_safetensors({name: t}, dtype, str(tmp_path / "ours"), dtype.itemsize)  # an element a chunk
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


# -----------------------------------------------------------------------------
# 2. the tokenizer and the chat template


def dolly_texts(records):
    return [format_prompt(r["instruction"], r["context"]) + r["response"].strip() + EOT_TEXT for r in records]


def test_tokenizer_gives_tiktokens_ids(exports, enc, records):
    path, _ = exports["finetuned"]
    texts = dolly_texts(records)
    want = [enc.encode(t, allowed_special={EOT_TEXT}) for t in texts]
    assert all(ids[-1] == EOT for ids in want)
    auto = transformers.AutoTokenizer.from_pretrained(path)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == (EOT_TEXT,) * 3 and auto.eos_token_id == EOT
    assert auto(texts)["input_ids"] == want
    fast = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    assert [e.ids for e in fast.encode_batch(texts)] == want
    # GPT-2's original files, for older tools
    old = tokenizers.ByteLevelBPETokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    old.add_special_tokens([EOT_TEXT])
    assert [e.ids for e in old.encode_batch(texts)] == want
    assert auto.decode(want[0]) == texts[0]


def test_tokenizer_files_are_what_transformers_writes(exports, tmp_path):
    path, _ = exports["finetuned"]
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(path, name), "rb").read(), name
    with open(tmp_path / "tokenizer_config.json") as f:
        resaved = json.load(f)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert json.load(f) == {k: v for k, v in resaved.items() if k not in ("is_local", "local_files_only")}


def test_chat_template_is_format_prompt(exports, records):
    tok = transformers.AutoTokenizer.from_pretrained(exports["finetuned"][0])
    with_context = [r for r in records if r["context"].strip()][:20]
    without = [r for r in records if not r["context"].strip()][:20]
    assert with_context and without
    for r in with_context + without + [{"instruction": "  Name a bird.\n", "context": " \n"}]:
        messages = [{"role": "user", "content": r["instruction"]}]
        plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert plain == format_prompt(r["instruction"])
        given = tok.apply_chat_template(messages, context=r["context"], tokenize=False, add_generation_prompt=True)
        assert given == format_prompt(r["instruction"], r["context"])


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "assistant", "content": "Hello"}],
])
def test_chat_template_refuses_other_conversations(exports, messages):
    tok = transformers.AutoTokenizer.from_pretrained(exports["finetuned"][0])
    with pytest.raises(Exception, match="fine-tuned on single instructions: pass exactly one message"):
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -----------------------------------------------------------------------------
# 3. generation: transformers' greedy generate() is chat.py --temperature 0


def test_greedy_generate_matches_chat(exports, enc, records):
    path, loaded = exports["finetuned"]
    hf, tok = load_hf(path), transformers.AutoTokenizer.from_pretrained(path)
    picked = [r for r in records if len(enc.encode_ordinary(format_prompt(r["instruction"], r["context"]))) < 120]
    lengths = []
    for r in picked[:2] + [r for r in picked if r["context"].strip()][:2]:
        text, _ = chat.respond(loaded.model, enc, r["instruction"], r["context"], NEW_TOKENS, temperature=0)
        want = fd.generate(loaded.model, enc.encode_ordinary(format_prompt(r["instruction"], r["context"])),
                           NEW_TOKENS, temperature=0)
        inputs = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], context=r["context"],
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)[0, inputs["input_ids"].shape[1]:]
        got = out.tolist()[:-1] if out[-1] == EOT else out.tolist()
        assert got == want
        assert tok.decode(got).strip() == text
        lengths.append(len(got))
    assert max(lengths) >= 10  # the answers are not all empty
    # the same through a pipeline with the chat template, as a user would call it
    generator = transformers.pipeline("text-generation", model=path)
    r = picked[0]
    answer = generator([{"role": "user", "content": r["instruction"]}], do_sample=False, max_new_tokens=NEW_TOKENS)
    text, _ = chat.respond(loaded.model, enc, r["instruction"], max_new_tokens=NEW_TOKENS, temperature=0)
    assert answer[0]["generated_text"][-1]["content"].strip() == text


def test_default_generation_stops_where_chat_stops(exports, enc, records):
    """A prompt near the end of the context: generate() with the export's generation config (no max_new_tokens)
    fills the context as chat.py does: prompt and answer take n_positions tokens."""
    path, loaded = exports["finetuned"]
    hf, tok = load_hf(path), transformers.AutoTokenizer.from_pretrained(path)
    r = next(r for r in records if 200 <= len(enc.encode_ordinary(format_prompt(r["instruction"], r["context"]))) < 250)
    text, stop = chat.respond(loaded.model, enc, r["instruction"], r["context"], temperature=0)
    assert stop == "block_size"
    inputs = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], context=r["context"],
                                     add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = hf.generate(**inputs)
    assert out.shape[1] == 256
    assert tok.decode(out[0, inputs["input_ids"].shape[1]:]).strip() == text


# -----------------------------------------------------------------------------
# 4. the model card


def card_header(path):
    with open(os.path.join(path, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("---\n")
    return text.split("---\n")[1], text


def test_model_card(exports, sources):
    header, text = card_header(exports["finetuned"][0])
    assert "license: cc-by-sa-3.0\n" in header and "pipeline_tag: text-generation\n" in header
    assert "datasets:\n- databricks/databricks-dolly-15k\n" in header
    assert "base_model" not in header  # a random init, not a Hub model
    with open(os.path.join(sources["finetuned"], "metrics.jsonl")) as f:
        evals = {r["step"]: r for r in map(json.loads, f) if "val_loss" in r}
    assert f"| **all** | {evals[0]['val_loss']:.4f} | {evals[6]['val_loss']:.4f} |" in text
    assert f"| open_qa | {evals[0]['val_loss_per_category']['open_qa']:.4f} |" in text
    assert "| steps | 6 of 6 (6,144 tokens) |" in text
    assert "50,257 logits" in text and "### Instruction:\n{instruction}\n\n### Response:" in text


def test_model_card_of_an_unfinetuned_model_and_another_license(sources, tmp_path):
    out = str(tmp_path / "nano")
    assert export_hf.main(["--checkpoint", sources["nanogpt"], "--out_dir", out, "--license", "mit"]) == 0
    header, text = card_header(out)
    assert "license: mit\n" in header and "datasets" not in header and "not fine-tuned" in text
    assert export_hf.describe_start("hub:gpt2-medium")[1] == "openai-community/gpt2-medium"


# -----------------------------------------------------------------------------
# 5. writing: the same bytes twice; bad input is one line and leaves nothing behind


def test_exporting_twice_gives_the_same_bytes(exports, sources, tmp_path):
    first, _ = exports["finetuned"]
    export_hf.export(sources["finetuned"], str(tmp_path / "again"))  # in this process; the first ran in the CLI
    for name in ("model.safetensors", *export_hf.CONFIG_FILES):
        assert (tmp_path / "again" / name).read_bytes() == open(os.path.join(first, name), "rb").read(), name


class _Evil:
    """Runs a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_inputs(base, sources):
    """{case: (--checkpoint, --out_dir, error text)}."""
    os.makedirs(base / "empty_run")
    (base / "empty_run" / "log.txt").write_text("a run that saved nothing\n")
    (base / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"model": {}, "config": _Evil(base / "PWNED"), "step": 1}, base / "evil.pt")
    os.makedirs(base / "taken")
    (base / "taken" / "keep.txt").write_text("mine")
    return {
        "missing file": (str(base / "nope.pt"), str(base / "new" / "out"), "no such file"),
        "log dir without checkpoints": (str(base / "empty_run"), str(base / "new" / "out"), "no checkpoint in"),
        "unsafe pickle": (str(base / "evil.pt"), str(base / "new" / "out"), "refusing to load"),
        "not a checkpoint": (str(base / "notes.txt"), str(base / "new" / "out"), "not a PyTorch checkpoint"),
        "existing out_dir": (sources["random"], str(base / "taken"), "exists and is not empty; pass --force"),
    }


def test_bad_input_is_one_line_and_leaves_nothing(sources, tmp_path, capsys):
    for case, (checkpoint, out_dir, message) in bad_inputs(tmp_path, sources).items():
        before = sorted(os.listdir(tmp_path))
        assert export_hf.main(["--checkpoint", checkpoint, "--out_dir", out_dir]) == 1, case
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, captured.err)
        assert not captured.out
        assert sorted(os.listdir(tmp_path)) == before, case  # no staging folder, no new parent folder
    assert not (tmp_path / "PWNED").exists()
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_bad_input_through_the_cli(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    r = subprocess.run([PYTHON, os.path.join(ROOT, "model", "export_hf.py"), "--checkpoint",
                        str(tmp_path / "notes.txt"), "--out_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and os.listdir(tmp_path) == ["notes.txt"]


def test_force_replaces_a_folder_only_when_the_new_one_is_complete(sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "old.txt").write_text("old export")
    # a write that fails half-way (a full disk): the old folder stays, the staging folder goes

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_hf, "write_safetensors", disk_full)
    assert export_hf.main(["--checkpoint", sources["random"], "--out_dir", str(out), "--force"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]
    monkeypatch.undo()
    assert export_hf.main(["--checkpoint", sources["random"], "--out_dir", str(out), "--force"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert "old.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_a_folder_filled_during_the_export_is_not_replaced_without_force(tmp_path):
    staging, out = tmp_path / "out.tmp1", tmp_path / "out"
    os.makedirs(staging)
    os.makedirs(out)
    (out / "theirs.txt").write_text("written while the export ran")
    with pytest.raises(fd.UserError, match="no longer empty; pass --force"):
        export_hf.publish(str(staging), str(out), force=False)
    assert os.listdir(out) == ["theirs.txt"]


def test_force_never_deletes_checkpoints(sources, capsys):
    assert export_hf.main(["--checkpoint", sources["random"], "--out_dir", sources["finetuned"], "--force"]) == 1
    assert "holds fine-tune checkpoints" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(sources["finetuned"], "model_best.pt"))


# -----------------------------------------------------------------------------
# 6. the round trip: the trainer starts a new fine-tune from an export, with the same logits


def test_finetune_starts_from_an_export(exports, data_dir, enc, records, tmp_path):
    path, loaded = exports["finetuned"]
    r = run_trainer(data_dir, tmp_path, "--pretrained_checkpoint", path, "--max_steps", "1",
                    "--checkpoint_interval", "1")
    assert r.returncode == 0, r.stderr
    ckpt = fd.load_checkpoint(str(tmp_path / "model_00001.pt"))
    assert ckpt["init_source"] == f"hub:{path}" and ckpt["model_config"]["vocab_size"] == VOCAB_SIZE
    start, _ = fd.start_model(ckpt, str(tmp_path / "model_00001.pt"))  # loaded again as the trainer loaded it
    ids = real_ids(enc, records, 256)
    with torch.no_grad():
        want, _ = loaded.model(ids)
        got, _ = start(ids)
    assert (got - want[..., :VOCAB_SIZE]).abs().max().item() <= 1e-5
    assert asdict(start.config) == {**asdict(loaded.model.config), "vocab_size": VOCAB_SIZE}
