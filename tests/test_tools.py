"""Tests of the tools around the trainer: model/plot_loss.py (loss.png) and model/chat.py (talking to a checkpoint).
CPU only, no downloads; the chat tests share one 2-step fine-tune of a tiny model."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import chat
import finetune_dolly as fd
import plot_loss
import prepare_dolly
from prepare_dolly import EOT, get_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ["brainstorming", "closed_qa", "open_qa", "summarization"]


def run(root, *args):
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer(verbose=False)


@pytest.fixture(autouse=True)
def shared_tokenizer(enc, monkeypatch):
    """chat.main's tokenizer, built once: offline, each call would read the bundled rank file again."""
    monkeypatch.setattr(chat, "get_tokenizer", lambda verbose=True: enc)


# -----------------------------------------------------------------------------
# plot_loss.py


def write_metrics(path, steps=8, eval_every=4, partial_last_line=False):
    """A metrics.jsonl as the trainer writes it: step 0 has no train_loss; eval steps carry val losses per category."""
    with open(path, "w") as f:
        per_cat = {c: 3.0 + 0.1 * i for i, c in enumerate(CATEGORIES)}
        f.write(json.dumps({"step": 0, "val_loss": 3.0, "val_loss_per_category": per_cat}) + "\n")
        for step in range(1, steps + 1):
            record = {"step": step, "train_loss": 3.0 - 0.05 * step, "lr": 6e-5, "grad_norm": 1.0,
                      "tokens_per_sec": 1e4}
            if step % eval_every == 0:
                per_cat = {c: 2.9 - 0.02 * step + 0.1 * i for i, c in enumerate(CATEGORIES)}
                per_cat["open_qa"] = None  # a category without val tokens in the evaluated slice
                record.update(val_loss=2.9 - 0.03 * step, val_loss_per_category=per_cat)
            f.write(json.dumps(record) + "\n")
        if partial_last_line:
            f.write('{"step": 9, "train_lo')  # the trainer is writing this line right now
    return path


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_writes_png_with_categories(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", partial_last_line=True)
    out = plot_loss.plot_metrics(str(metrics), str(tmp_path / "out.png"))
    assert out == str(tmp_path / "out.png")
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # written via a temp file, then renamed


def test_plot_default_output_beside_metrics_and_cli(tmp_path, capsys):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    assert plot_loss.main([str(metrics)]) == 0
    assert_png(tmp_path / "loss.png")
    assert plot_loss.main([str(metrics), "-o", str(tmp_path / "x.png")]) == 0
    assert_png(tmp_path / "x.png")
    assert "wrote" in capsys.readouterr().out


def test_plot_without_val_or_categories(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 3.0 / s}) + "\n" for s in range(1, 4)))
    assert_png(plot_loss.plot_metrics(str(path)))


def test_plot_errors_for_missing_and_empty_metrics(tmp_path, capsys):
    with pytest.raises(plot_loss.PlotError, match="no such file"):
        plot_loss.plot_metrics(str(tmp_path / "nope.jsonl"))
    assert plot_loss.main([str(tmp_path / "nope.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file" in err and err.count("\n") == 1
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_loss.main([str(tmp_path / "empty.jsonl")]) == 1
    assert "empty file" in capsys.readouterr().err


def test_plot_names_a_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 3.0}\nnot json\n{"step": 2, "train_loss": 2.9}\n')
    with pytest.raises(plot_loss.PlotError, match=r"metrics.jsonl:2: not a metrics record"):
        plot_loss.plot_metrics(str(path))


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    with pytest.raises(plot_loss.PlotError, match="pip install matplotlib"):
        plot_loss.plot_metrics(str(metrics))


def test_plot_takes_a_log_dir(root, tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    r = run(root, "model/plot_loss.py", str(tmp_path))  # as `python model/plot_loss.py logs_finetune`
    assert r.returncode == 0, r.stderr
    assert_png(tmp_path / "loss.png")  # beside the metrics.jsonl, as for the file itself
    (tmp_path / "no_run").mkdir()
    with pytest.raises(plot_loss.PlotError, match="no_run/ holds no metrics.jsonl"):
        plot_loss.plot_metrics(str(tmp_path / "no_run"))
    assert not (tmp_path / "no_run" / "loss.png").exists()


def test_plot_format_follows_the_extension(tmp_path, capsys):
    metrics = str(write_metrics(tmp_path / "metrics.jsonl"))
    magic = {"x.jpg": b"\xff\xd8\xff", "x.JPEG": b"\xff\xd8\xff", "x.pdf": b"%PDF", "x.svg": b"<?xml",
             "x.png": PNG_MAGIC}
    for name, head in magic.items():
        assert plot_loss.main([metrics, "-o", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(head), name
    capsys.readouterr()
    for name in ("x.xyz", "noext"):  # refused before anything is written
        assert plot_loss.main([metrics, "-o", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "name the output .png" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.jsonl", *magic])


def test_plot_leaves_out_malformed_values(tmp_path):
    """A hand-edited or foreign log: values that are not numbers (or a per-category dict) are left out, not a crash."""
    records = [{"step": 0, "val_loss": 3.0, "val_loss_per_category": {"open_qa": 3.0}},
               {"step": 1, "train_loss": "2.9", "val_loss": True, "val_loss_per_category": [2.9, 2.8]},
               {"step": 2, "train_loss": 2.8, "val_loss_per_category": "open_qa"},
               {"step": "3", "train_loss": 2.7, "val_loss": 2.6,
                "val_loss_per_category": {"open_qa": [1], "closed_qa": 2.5}}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert_png(plot_loss.plot_metrics(str(path)))
    assert plot_loss._points(plot_loss.read_metrics(str(path)), "val_loss") == ([0, 3], [3.0, 2.6])


# -----------------------------------------------------------------------------
# chat.py on a checkpoint written by the trainer


@pytest.fixture(scope="module")
def tiny_run(root, tmp_path_factory):
    """Log dir of a 2-step fine-tune of a 2-layer, 32-wide random-init model on the bundled Dolly sample."""
    base = tmp_path_factory.mktemp("tiny_run")
    data, logs = str(base / "data"), str(base / "logs")
    assert prepare_dolly.main(["--output_dir", data, "--quiet"]) == 0
    r = run(root, "model/finetune_dolly.py", "--data_dir", data, "--log_dir", logs, "--pretrained_checkpoint", "none",
            "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--sequence_length", "64",
            "--batch_size", "4", "--total_batch_size", "512", "--max_steps", "2", "--generate_interval", "0",
            "--val_tokens", "512")
    assert r.returncode == 0, r.stderr
    return logs


def test_plot_of_a_real_run(tiny_run, tmp_path):
    assert_png(plot_loss.plot_metrics(os.path.join(tiny_run, "metrics.jsonl"), str(tmp_path / "loss.png")))


def test_chat_one_shot_is_deterministic_per_seed(root, tiny_run, capsys):
    ckpt = os.path.join(tiny_run, "model_00002.pt")
    args = ["model/chat.py", "--checkpoint", ckpt, "--prompt", "Name three birds.", "--max_new_tokens", "20",
            "--device", "cpu"]
    # two separate processes, started together so that their start-ups overlap; a tiny model gains nothing from
    # threads, and two processes would fight for them
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *args, "--seed", "1"], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    (out1, err1), (out2, _) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], err1
    assert out1.strip() and out1 == out2  # stdout holds only the answer
    assert "model_00002.pt" in err1  # what was loaded goes to stderr
    # another seed, in-process (same code path as the CLI, without a second torch start-up)
    answers = []
    for seed in ("1", "2"):
        assert chat.main(args[1:] + ["--seed", seed]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] != answers[1]


def test_a_log_dir_means_its_best_checkpoint_else_the_newest_that_loads(tiny_run, tmp_path, capsys):
    """The one rule chat, export and eval share for a log dir (fd.pick_checkpoint)."""
    logs = str(tmp_path / "logs")
    shutil.copytree(tiny_run, logs)
    model, description = chat.load_model(logs)
    assert description.startswith(os.path.join(logs, "model_best.pt")) and "step 2" in description
    ckpt = fd.load_checkpoint(os.path.join(logs, "model_best.pt"))
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    os.remove(os.path.join(logs, "model_best.pt"))  # a hard link of model_00002.pt: not written into
    with open(os.path.join(logs, "model_best.pt"), "wb") as f:
        f.write(b"PK\x03\x04 damaged")
    _, description = chat.load_model(logs)
    assert description.startswith(os.path.join(logs, "model_00002.pt"))
    assert "skipping checkpoint" in capsys.readouterr().out
    for name in os.listdir(logs):
        if name.endswith(".pt"):
            os.remove(os.path.join(logs, name))
    with pytest.raises(fd.UserError, match="no checkpoint in .*model_best.pt or model_NNNNN.pt"):
        chat.load_model(logs)


def test_a_mapped_model_is_the_copied_one(tiny_run, tmp_path):
    """load_model(mapped=True), the export's: the weights stay in the mapped checkpoint file, tied and in float32 as
    in a copied model; for a fine-tune checkpoint and for a bare bfloat16 state dict of a compiled model."""
    bare = str(tmp_path / "bf16.pt")
    torch.save({"_orig_mod." + k: v.to(torch.bfloat16) for k, v in fd.load_model(tiny_run).model.state_dict().items()},
               bare)
    for path in (tiny_run, bare):
        copied, mapped = fd.load_model(path).model, fd.load_model(path, mapped=True).model
        assert mapped.transformer.wte.weight is mapped.lm_head.weight
        assert all(p.dtype == torch.float32 and not p.is_meta for p in mapped.parameters())
        assert copied.state_dict().keys() == mapped.state_dict().keys()
        assert all(torch.equal(v, mapped.state_dict()[k]) for k, v in copied.state_dict().items())
        ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(copied(ids)[0], mapped(ids)[0])


def test_chat_streams_the_text_it_returns(tiny_run, enc):
    model, _ = chat.load_model(os.path.join(tiny_run, "model_best.pt"))
    pieces = []
    text, stop = chat.respond(model, enc, "Name three birds.", "Birds fly.", max_new_tokens=30,
                              generator=torch.Generator().manual_seed(0), on_text=pieces.append)
    assert text and "".join(pieces).strip() == text and len(pieces) > 1
    assert stop in ("max_new_tokens", "block_size", "eot")


def test_chat_streams_whole_characters(enc, monkeypatch):
    """An emoji spans several GPT-2 tokens; the stream must never show half of one as U+FFFD."""
    ids = enc.encode_ordinary(" naïve 😀!")
    assert len(enc.decode_single_token_bytes(ids[-2])) < 4  # the emoji really is split

    def fake_generate(model, prompt, *args, on_token=None, **kwargs):
        for token in ids:
            on_token(token)
        return ids

    monkeypatch.setattr(fd, "generate", fake_generate)
    pieces = []
    text, _ = chat.respond(model_that_always_says(EOT), enc, "Say it", on_text=pieces.append)
    assert "".join(pieces) == text == "naïve 😀!" and not any("\ufffd" in p for p in pieces)


def test_chat_interactive_loop(tiny_run, monkeypatch, capsys):
    seen = []
    real_respond = chat.respond

    def spy(model, enc, instruction, context="", *args, **kwargs):
        seen.append((instruction, context))
        return real_respond(model, enc, instruction, context, *args, **kwargs)

    monkeypatch.setattr(chat, "respond", spy)
    typed = "context: Birds fly.\nName three birds.\n\nAgain?\nquit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    assert chat.main(["--checkpoint", tiny_run, "--max_new_tokens", "5"]) == 0
    # a context goes with the next instruction only
    assert seen == [("Name three birds.", "Birds fly."), ("Again?", "")]
    out = capsys.readouterr().out
    assert out.startswith(chat.HELP_LINE) and "context of 10 characters" in out and "[cut at --max_new_tokens 5]" in out


def test_chat_interactive_exits_on_eof(tiny_run, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat.main(["--checkpoint", tiny_run]) == 0


# -----------------------------------------------------------------------------
# chat.py: stopping, other checkpoint formats, errors


def model_that_always_says(token, block_size=32):
    """A GPT whose next-token logits are 80 for `token` and 0 for every other id, whatever the input:
    ln_f outputs its bias (ones), and only lm_head's row `token` is non-zero."""
    model = fd.GPT(fd.GPTConfig(block_size=block_size, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()  # tied to wte; the embeddings do not matter here
        model.lm_head.weight[token] = 10.0
    return model


def test_chat_stops_at_eot(enc):
    pieces = []
    for temperature in (0.0, 0.8):
        text, stop = chat.respond(model_that_always_says(EOT), enc, "Say hi", max_new_tokens=50,
                                  temperature=temperature, generator=torch.Generator().manual_seed(0),
                                  on_text=pieces.append)
        assert (text, stop) == ("", "eot")
    assert pieces == []  # the EOT itself is never streamed


def test_chat_without_eot_stops_at_the_limits(enc):
    hi = enc.encode_ordinary(" hi")[0]
    model = model_that_always_says(hi)
    text, stop = chat.respond(model, enc, "Say hi", max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert (text, stop) == ("hi hi hi hi hi", "max_new_tokens")
    prompt_len = len(enc.encode_ordinary(chat.format_prompt("Say hi")))
    text, stop = chat.respond(model, enc, "Say hi", max_new_tokens=100, generator=torch.Generator().manual_seed(0))
    assert stop == "block_size" and text.count("hi") == 32 - prompt_len


def test_chat_refuses_a_prompt_longer_than_the_block(enc):
    with pytest.raises(fd.UserError, match="the prompt is .* tokens but the model reads at most 32; shorten"):
        chat.respond(model_that_always_says(EOT), enc, "word " * 40)


def test_chat_loads_a_build_nanogpt_checkpoint(tmp_path):
    """build-nanogpt's train_gpt2.py saves {'model', 'config', 'step', 'val_loss'}: loaded through
    fd.load_pretrained."""
    src = model_that_always_says(EOT)
    path = str(tmp_path / "model_19072.pt")
    torch.save({"model": src.state_dict(), "config": vars(src.config).copy(), "step": 19072, "val_loss": 3.0}, path)
    model, description = chat.load_model(path)
    assert description == f"pretrained:{path}, pretrained step 19072"
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_chat_errors_are_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    cases = {str(tmp_path / "missing.pt"): "no such file; pass a fine-tune checkpoint",
             str(tmp_path / "notes.pt"): "notes.pt",  # "refusing to load" (not a pickle of plain data) or "unreadable"
             str(tmp_path / "empty.pt"): "empty file",
             str(tmp_path / "empty_dir"): "no checkpoint in"}
    for checkpoint, message in cases.items():
        assert chat.main(["--checkpoint", checkpoint, "--prompt", "hi"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_chat_refuses_nan_weights(tiny_run, tmp_path, capsys):
    """A diverged run's checkpoint: one line and exit 1, not a crash in sampling (or '!!!!' when greedy)."""
    ckpt = torch.load(os.path.join(tiny_run, "model_00002.pt"), weights_only=True)
    next(v for k, v in ckpt["model"].items() if k.endswith("mlp.c_fc.weight")).fill_(float("nan"))
    path = str(tmp_path / "model_00009.pt")
    torch.save(ckpt, path)
    for temperature in ("0.8", "0"):
        argv = ["--checkpoint", path, "--prompt", "hi", "--max_new_tokens", "3", "--temperature", temperature]
        assert chat.main(argv) == 1
        out, err = capsys.readouterr()
        expected = (rf"error: {re.escape(path)} holds NaN/inf weights \(in 1 tensor; the run diverged\); "
                    r"use an earlier checkpoint\n")
        assert out == "" and re.fullmatch(expected, err), err
    src = model_that_always_says(EOT)  # a build-nanogpt checkpoint goes through load_pretrained: checked as well
    with torch.no_grad():
        src.transformer.wpe.weight[0, 0] = float("inf")
    nanogpt_ckpt = {"model": src.state_dict(), "config": vars(src.config).copy(), "step": 19072}
    torch.save(nanogpt_ckpt, str(tmp_path / "model_19072.pt"))
    with pytest.raises(fd.UserError, match="model_19072.pt holds NaN/inf weights"):
        chat.load_model(str(tmp_path / "model_19072.pt"))


def test_an_empty_answer_is_explained():
    import chat
    assert "ended its answer at once" in chat.stop_note("eot", 256, 1024, "")
    assert chat.stop_note("eot", 256, 1024, "Paris.") is None


# -----------------------------------------------------------------------------
# bench/: the benchmarks themselves are not run here; these check that their data and the GPU script's code paths
# work


def test_bench_data_is_the_sample_drawn_from_across_dolly(root, tmp_path):
    """The benchmarks measure response-only loss on the bundled sample's first 111 records: all eight categories,
    with prompt and response tokens in Dolly's proportions, not the 97.5% open_qa of the whole sample."""
    sys.path.insert(0, os.path.join(root, "bench"))
    try:
        import common
    finally:
        sys.path.remove(os.path.join(root, "bench"))
    manifest = fd.load_manifest(common.prepare_representative(str(tmp_path)))
    assert len(manifest["categories"]) == 8 and manifest["records_read"] == common.RECORDS
    train = manifest["splits"]["train"]
    assert 0.4 < train["response_tokens"] / train["tokens"] < 0.6


def test_gpu_bench_smoke_runs_on_a_cpu(root, tmp_path):
    """bench/gpu.py --smoke: the CUDA benchmark's steps (ours all/response, build-nanogpt's full logits) on a tiny
    fp32 model; the first steps' losses agree and response-only trains on fewer targets."""
    out = tmp_path / "gpu.json"
    r = run(root, "bench/gpu.py", "--smoke", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"ours/all", "ours/response", "nanogpt/all"}
    assert result["rows"]["ours/all"]["target_share"] == 1.0 and 0 < result["rows"]["ours/response"]["target_share"] < 1
    same = [c for c in result["checks"] if c["what"].startswith("first-step loss")]
    assert len(same) == 1 and same[0]["pass"], result["checks"]
