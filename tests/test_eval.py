"""model/eval_dolly.py: the held-out examples read back from the shards, the scores against real oracles (the
trainer's metrics.jsonl, rouge-score, one-at-a-time generation, models whose answers are known), and bad input.
CPU only; most tests share one 4-step fine-tune of a 2-layer, 32-wide model, evaluated once before and after."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from rouge_score import rouge_scorer

import eval_dolly
import finetune_dolly as fd
import prepare_dolly
from conftest import PYTHON, ROOT, prepare, read_metrics, run_trainer
from prepare_dolly import EOT, format_prompt, get_tokenizer

MAX_NEW_TOKENS = 24  # with the tiny model's 64-token context: some answers are cut, some prompts skipped


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer(verbose=False)


def run_eval(*args):
    """eval_dolly.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = eval_dolly.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def unwrapped(text):
    """The text with its line breaks (the table's notes are wrapped) and repeated spaces as single spaces."""
    return " ".join(text.split())


def read_report(out_dir):
    with open(os.path.join(str(out_dir), "eval.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    """Log dir of a 4-step fine-tune of the tiny random-init model (conftest.TINY)."""
    log_dir = tmp_path_factory.mktemp("eval_run")
    r = run_trainer(data_dir, log_dir, "--max_steps", "4")
    assert r.returncode == 0, r.stderr
    return str(log_dir)


def eval_args(data_dir, tiny_run, out_dir=None):
    args = ["--data_dir", data_dir, "--checkpoint", f"start:{tiny_run}", "--checkpoint", tiny_run,
            "--max_new_tokens", MAX_NEW_TOKENS, "--batch_size", 8, "--device", "cpu", "--dtype", "float32"]
    return args + (["--out_dir", out_dir] if out_dir else [])


@pytest.fixture(scope="module")
def evaluated(data_dir, tiny_run, tmp_path_factory):
    """The finetune_dolly end-of-run command (start:LOG_DIR vs LOG_DIR) on the whole val split:
    (eval.json's report, stdout, out_dir)."""
    out_dir = tmp_path_factory.mktemp("eval_out")
    code, out, err = run_eval(*eval_args(data_dir, tiny_run, out_dir))
    assert code == 0, err
    return read_report(out_dir), out, str(out_dir)


# -----------------------------------------------------------------------------
# the examples


def test_examples_are_the_val_records(data_dir, enc):
    """Read back from the shards: the prompt is the record's format_prompt tokens, the reference its response, in
    the order of prepare_dolly's split of the bundled sample."""
    records, seen = [], set()
    for r in prepare_dolly.read_jsonl(prepare_dolly.BUNDLED_SAMPLE):  # as prepare() filters them
        key = (r["instruction"].strip(), r["context"].strip(), r["response"].strip())
        if r["response"].strip() and key not in seen:
            seen.add(key)
            records.append(r)
    _, val = prepare_dolly.split_records(records, 0.05, 1337)
    manifest = fd.load_manifest(data_dir)
    examples = eval_dolly.read_examples(data_dir, manifest, enc)
    assert len(examples) == len(val) == manifest["splits"]["val"]["records"]
    for ex, r in zip(examples, val):
        assert ex.category == r["category"]
        assert ex.prompt_tokens == enc.encode_ordinary(format_prompt(r["instruction"], r["context"]))
        assert ex.prompt == format_prompt(r["instruction"], r["context"]) and ex.reference == r["response"].strip()
        assert ex.tokens[-1] == EOT and EOT not in ex.tokens[:-1]
        assert eval_dolly.split_prompt(ex.prompt, manifest) == (r["instruction"].strip(), r["context"].strip())


def test_the_examples_go_round_robin_over_the_categories(evaluated, data_dir):
    report, _, _ = evaluated
    categories = fd.load_manifest(data_dir)["categories"]
    assert len(categories) == 8 and report["settings"]["examples"] == report["settings"]["val_examples"] == 157
    assert [e["category"] for e in report["examples"][:8]] == categories  # every category has a val example
    assert {e["category"] for e in report["examples"][8:]} == {"open_qa"}  # the sample's val split is mostly open_qa


# -----------------------------------------------------------------------------
# the scores


def test_val_loss_is_the_trainers_at_the_same_step(evaluated, tiny_run):
    """start:LOG_DIR is the step-0 model (the seeded random init rebuilt); LOG_DIR is model_best.pt: both val losses,
    overall and per category, are those in the run's metrics.jsonl."""
    report, _, _ = evaluated
    metrics = {m["step"]: m for m in read_metrics(tiny_run) if "val_loss" in m}
    start, best = report["checkpoints"]
    best_step = fd.load_checkpoint(os.path.join(tiny_run, "model_best.pt"))["step"]
    assert (start["step"], best["step"]) == (0, best_step) and best_step > 0
    for result in (start, best):
        logged = metrics[result["step"]]
        assert math.isclose(result["overall"]["val_loss"], logged["val_loss"], rel_tol=1e-5)
        for category, loss in logged["val_loss_per_category"].items():  # None: not in the run's first val_tokens
            ours = result["per_category"][category]["val_loss"]
            assert ours is loss is None or math.isclose(ours, loss, rel_tol=1e-5), category
        assert result["val_loss_settings"]["from"] == "checkpoint"
    assert best["overall"]["val_loss"] < start["overall"]["val_loss"]


def test_rouge_l_figures_are_the_librarys_means_over_the_answers(evaluated):
    report, _, _ = evaluated
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for k, result in enumerate(report["checkpoints"]):
        scored = [(e["category"], scorer.score(e["reference"], e["answers"][k])["rougeL"].fmeasure)
                  for e in report["examples"] if e["answers"][k] is not None]
        assert len(scored) == result["overall"]["examples"] > 100
        assert math.isclose(result["overall"]["rouge_l"], sum(s for _, s in scored) / len(scored), abs_tol=1e-12)
        for category, cell in result["per_category"].items():
            mine = [s for c, s in scored if c == category]
            assert cell["examples"] == len(mine)
            assert cell["rouge_l"] is None if not mine else math.isclose(cell["rouge_l"], sum(mine) / len(mine),
                                                                         abs_tol=1e-12)


def test_rouge_l_is_one_for_the_reference_and_zero_without_a_common_word():
    scorer = eval_dolly.rouge_scorer()
    reference = "The capital of France is Paris, a city on the Seine."
    assert eval_dolly.rouge_l(scorer, reference, reference) == 1.0
    assert eval_dolly.rouge_l(scorer, reference, "Bananas grow quickly in warm weather.") == 0.0
    assert eval_dolly.rouge_l(scorer, "Dogs were running.", "dog was runs") > 0.6  # stemmed: dog/dogs, running/runs
    assert eval_dolly.rouge_l(scorer, reference, "") == 0.0


def test_answers_in_eval_json_are_one_at_a_time_greedy_answers(evaluated, tiny_run, enc):
    """eval.json's answers came from batches of prompts sorted by length (fd.generate_batch, left-padded); in fp32
    each equals what fd.generate gives the prompt alone."""
    report, _, _ = evaluated
    model = fd.load_model(tiny_run).model
    checked = 0
    for e in report["examples"][:48]:
        if e["answers"][1] is not None:
            tokens = fd.generate(model, enc.encode_ordinary(e["prompt"]), MAX_NEW_TOKENS, temperature=0)
            assert e["answers"][1] == enc.decode(tokens).strip()
            assert e["scores"][1]["answer_tokens"] == len(tokens)
            checked += 1
    assert checked > 30


def test_batched_generation_equals_one_at_a_time(tiny_run, data_dir, enc):
    model = fd.load_model(tiny_run).model
    examples = eval_dolly.read_examples(data_dir, fd.load_manifest(data_dir), enc)
    prompts = [ex.prompt_tokens for ex in examples if ex.prompt_len < 40][:20]
    assert len({len(p) for p in prompts}) > 5  # prompts of many lengths share batches: padding is exercised
    batched = eval_dolly.generate_answers(model, prompts, 30, batch_size=6)
    assert batched == [fd.generate(model, p, 30, temperature=0) for p in prompts]


def test_the_same_command_twice_gives_the_same_eval_json(evaluated, data_dir, tiny_run, tmp_path):
    """A second run, in another process and without --out_dir (the command the trainer prints): eval.json in
    LOG_DIR/eval/, identical to the byte; the same table on stdout."""
    report, out, out_dir = evaluated
    r = subprocess.run([PYTHON, os.path.join(ROOT, "model", "eval_dolly.py"),
                        *map(str, eval_args(data_dir, tiny_run))], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    default_out_dir = os.path.join(tiny_run, "eval")
    with open(os.path.join(out_dir, "eval.json"), "rb") as first:
        with open(os.path.join(default_out_dir, "eval.json"), "rb") as second:
            assert first.read() == second.read()
    assert r.stdout == out.replace(out_dir, default_out_dir)
    for title in ("A = start:", "B = ", "B - A (difference)"):
        assert title in out
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert f"{report['checkpoints'][0]['overall']['val_loss']:.4f}" in overall


def test_eval_md_holds_the_tables_and_one_example_per_category(evaluated, data_dir):
    report, _, out_dir = evaluated
    with open(os.path.join(out_dir, "eval.md"), encoding="utf-8") as f:
        md = f.read()
    assert "### B - A (difference)" in md and md.count("| overall |") == 3
    examples = md.split("## One example per category")[1]
    categories = fd.load_manifest(data_dir)["categories"]
    assert [line.split(" | ")[0].lstrip("| ") for line in examples.splitlines() if line.startswith("| ")][1:] == \
        categories


def write_parrot(path, token, block_size=32):
    """A build-nanogpt-style checkpoint of a GPT whose next-token logits are 80 for `token` and 0 for every other
    id, whatever the input: ln_f outputs its bias (ones), and only the output layer's row `token` is non-zero."""
    model = fd.GPT(fd.GPTConfig(block_size=block_size, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 10.0
    torch.save({"model": model.state_dict(), "config": vars(model.config).copy(), "step": 1}, str(path))
    return str(path)


def test_stop_rate_cut_skipped_and_loss_of_models_whose_answers_are_known(data_dir, enc, tmp_path):
    """A model that always says EOT stops every answer at once (empty); one that always says " the" never stops: its
    answers run to --max_new_tokens or are cut at the block size (not failures); prompts that fill its 32-token
    context are skipped. Its loss is 80 per response target other than " the" (logit 80 against 0), ~0 on " the"."""
    the = enc.encode_ordinary(" the")[0]
    eot, parrot = write_parrot(tmp_path / "eot.pt", EOT), write_parrot(tmp_path / "the.pt", the)
    code, out, err = run_eval("--data_dir", data_dir, "--checkpoint", eot, "--checkpoint", parrot, "--max_new_tokens",
                              8, "--device", "cpu", "--dtype", "float32", "--out_dir", tmp_path / "out")
    assert code == 0, err
    report = read_report(tmp_path / "out")
    examples = eval_dolly.read_examples(data_dir, fd.load_manifest(data_dir), enc)
    fit = [ex for ex in examples if ex.prompt_len < 32]
    assert 0 < len(fit) < len(examples)
    silent, talker = (r["overall"] for r in report["checkpoints"])
    assert silent["examples"] == talker["examples"] == len(fit)
    assert silent["skipped"] == talker["skipped"] == len(examples) - len(fit)
    assert (silent["stop_rate"], silent["empty"], silent["answer_tokens"], silent["cut"]) == (1.0, 1.0, 0.0, 0)
    lengths = [min(8, 32 - ex.prompt_len) for ex in fit]  # generation stops once prompt and answer fill the block
    cut = sum(n < 8 for n in lengths)
    assert 0 < cut < len(fit)
    assert (talker["cut"], talker["stop_rate"], talker["empty"]) == (cut, 0.0, 0.0)
    assert math.isclose(talker["answer_tokens"], sum(lengths) / len(fit))
    for e in report["examples"]:
        n = min(8, 32 - e["prompt_tokens"])
        assert e["answers"][1] == (" ".join(["the"] * n) if e["prompt_tokens"] < 32 else None)
    # each example's loss: its response targets as far as the 32-token block reaches, scored after its own prompt
    losses = []
    for ex in fit:
        targets = ex.tokens[ex.prompt_len:32 + 1]
        losses.append(80.0 * sum(t != the for t in targets) / len(targets))
    assert math.isclose(talker["loss"], sum(losses) / len(losses), rel_tol=1e-5)
    assert report["checkpoints"][1]["val_loss_settings"] == {"batch_size": 16, "sequence_length": 32, "val_tokens": 0,
                                                             "loss_on": "response", "from": "trainer defaults"}
    assert "is no fine-tune checkpoint: its val_loss uses the trainer's defaults" in unwrapped(out)


# -----------------------------------------------------------------------------
# notes and bad input


def test_max_examples_and_categories_without_examples_are_notes(data_dir, tiny_run, tmp_path):
    code, out, err = run_eval("--data_dir", data_dir, "--checkpoint", tiny_run, "--max_examples", 3,
                              "--max_new_tokens", 4, "--out_dir", tmp_path / "three")
    assert code == 0, err
    report = read_report(tmp_path / "three")
    categories = report["settings"]["categories"]
    assert [e["category"] for e in report["examples"]] == categories[:3]
    for category in categories[3:]:
        note = f"note: {category}: no examples (none among the first --max_examples); its cells are empty"
        assert note in unwrapped(out)
        cell = report["checkpoints"][0]["per_category"][category]
        assert cell["examples"] == 0 and cell["rouge_l"] is None and cell["loss"] is None
    code, out, err = run_eval("--data_dir", data_dir, "--checkpoint", tiny_run, "--max_examples", 1000,
                              "--max_new_tokens", 2, "--out_dir", tmp_path / "all")
    assert code == 0, err
    assert "note: --max_examples 1000 is more than the val split's 157 examples: all 157 are scored" in unwrapped(out)
    assert read_report(tmp_path / "all")["settings"]["examples"] == 157


def test_a_checkpoint_trained_on_other_data_is_flagged(data_dir, tiny_run, tmp_path):
    other = prepare(tmp_path / "other", "--seed", "7")  # another split of the same records
    code, out, err = run_eval("--data_dir", other, "--checkpoint", tiny_run, "--max_examples", 2, "--max_new_tokens", 2,
                              "--out_dir", tmp_path / "out")
    assert code == 0, err
    out = unwrapped(out)
    assert "was fine-tuned on other data" in out and 'its "held-out" examples may have been trained on' in out


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "nowhere/model_00001.pt"], "nowhere/model_00001.pt: no such file; pass a fine-tune checkpoint"),
    (["--checkpoint", "start:nowhere"], "start:nowhere: nowhere is no file or folder here"),
    (["--checkpoint", "start:"], "name the run after start:"),
    (["--checkpoint", "RUN", "--max_new_tokens", "0", "--batch_size", "0"],
     "--max_new_tokens must be >= 1, got 0; --batch_size must be >= 1, got 0"),
    (["--checkpoint", "RUN", "--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--checkpoint", "RUN", "--data_dir", "EMPTY"], "manifest.json missing); run `python model/prepare_dolly.py`"),
])
def test_bad_input_is_one_line_and_exit_1(args, message, data_dir, tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [{"RUN": tiny_run, "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    code, out, err = run_eval("--data_dir", data_dir, *args, "--out_dir", tmp_path / "out")
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_start_of_a_model_that_is_no_fine_tune_is_refused(tmp_path, data_dir):
    path = write_parrot(tmp_path / "model_19072.pt", EOT)
    code, _, err = run_eval("--data_dir", data_dir, "--checkpoint", f"start:{path}", "--out_dir", tmp_path / "out")
    assert code == 1 and "is not a fine-tune checkpoint, so it names no run" in err and err.count("\n") == 1


def test_an_empty_val_split_is_refused(tmp_path, tiny_run):
    data = prepare(tmp_path / "data", "--val_fraction", "0")
    code, _, err = run_eval("--data_dir", data, "--checkpoint", tiny_run, "--out_dir", tmp_path / "out")
    assert code == 1 and "has an empty val split" in err and "--val_fraction > 0" in err


def test_without_rouge_score_it_says_how_to_install_it(monkeypatch, data_dir, tiny_run, tmp_path):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes the import raise ImportError
    code, _, err = run_eval("--data_dir", data_dir, "--checkpoint", tiny_run, "--out_dir", tmp_path / "out")
    assert code == 1 and err == f"error: the rouge-score package is missing; {eval_dolly.ROUGE_HINT}\n"


def test_default_out_dir_is_in_the_first_run_else_eval_out(tiny_run):
    candidates = [eval_dolly.Candidate("gpt2", "A", None, "", "gpt2", None, None, {}),
                  eval_dolly.Candidate(tiny_run, "B", None, "", "", 4, tiny_run, {})]
    assert eval_dolly.default_out_dir(candidates) == os.path.join(tiny_run, "eval")
    assert eval_dolly.default_out_dir(candidates[:1]) == eval_dolly.DEFAULT_OUT_DIR
