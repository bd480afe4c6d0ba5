"""The training core: LR schedule, masked loss, gradient accumulation, the loader's state, config checks, the CLI."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune_dolly as fd
from conftest import prepare, read_metrics, run_trainer


def tiny_model(seed=0, vocab_size=50304):
    torch.manual_seed(seed)
    return fd.GPT(fd.GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16))


# ---------------------------------------------------------------- LR schedule

def test_lr_schedule_exact_values():
    cfg = fd.TrainConfig(max_lr=6e-5, min_lr=6e-6, warmup_steps=2, max_steps=10)
    assert fd.get_lr(0, cfg) == pytest.approx(3e-5)  # mid-warmup, never 0 at step 0
    assert fd.get_lr(1, cfg) == pytest.approx(6e-5)  # end of warmup
    assert fd.get_lr(2, cfg) == pytest.approx(6e-5)  # decay starts at the peak
    assert fd.get_lr(6, cfg) == pytest.approx(6e-6 + 0.5 * (6e-5 - 6e-6))  # halfway down the cosine
    assert fd.get_lr(10, cfg) == pytest.approx(6e-6)  # end of decay
    assert fd.get_lr(500, cfg) == pytest.approx(6e-6)  # past the end: the floor
    guide = fd.TrainConfig()  # the guide's defaults: warmup 1, 6 steps
    assert fd.get_lr(0, guide) == pytest.approx(6e-5)
    assert all(fd.get_lr(s, guide) > fd.get_lr(s + 1, guide) for s in range(0, 5))


# ---------------------------------------------------------------- loss and accumulation

def test_masked_loss_equals_hand_computation():
    model = tiny_model()
    x = torch.randint(0, 50257, (2, 16))
    y = torch.randint(0, 50257, (2, 16))
    y[0, :5] = fd.IGNORE_INDEX
    y[1, 10:] = fd.IGNORE_INDEX
    _, loss = model(x, y)
    logits, _ = model(x)
    logp = F.log_softmax(logits.double(), dim=-1)
    picked = [-logp[b, t, y[b, t]] for b in range(2) for t in range(16) if y[b, t] != fd.IGNORE_INDEX]
    assert len(picked) == 2 * 16 - 5 - 6
    assert loss.item() == pytest.approx(torch.stack(picked).mean().item(), rel=1e-5)
    _, loss_sum = model(x, y, reduction="sum")
    assert loss_sum.item() == pytest.approx(torch.stack(picked).sum().item(), rel=1e-5)


def test_accumulation_equals_one_big_batch():
    x = torch.randint(0, 50257, (8, 16))
    y = torch.randint(0, 50257, (8, 16))
    y[torch.rand(8, 16) < 0.6] = fd.IGNORE_INDEX  # uneven masking per micro-batch
    num_targets = int((y != fd.IGNORE_INDEX).sum())
    big = tiny_model()
    fd.accumulate_gradients(big, [(x, y)], num_targets, 1, "cpu")
    small = tiny_model()
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    loss_sum = fd.accumulate_gradients(small, micro, num_targets, 1, "cpu")
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    _, mean_loss = tiny_model()(x, y)
    assert loss_sum.item() / num_targets == pytest.approx(mean_loss.item(), rel=1e-5)


# ---------------------------------------------------------------- data loader

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """The bundled sample in 20k-token shards, so batches cross shard boundaries."""
    return prepare(tmp_path_factory.mktemp("shards"), "--shard_size", "20000")


def make_loader(data_dir, rank=0, world_size=1, grad_accum=2, loss_on="response"):
    manifest = fd.load_manifest(data_dir)
    stream = fd.TokenStream(data_dir, "train", manifest)
    return fd.DataLoader(stream, 4, 64, grad_accum, rank, world_size, loss_on)


def test_stream_reads_across_shards_and_wraps(small_shards):
    manifest = fd.load_manifest(small_shards)
    assert len(manifest["splits"]["train"]["shards"]) > 3
    stream = fd.TokenStream(small_shards, "train", manifest)
    shards = manifest["splits"]["train"]["shards"]
    everything = np.concatenate([np.load(os.path.join(small_shards, s["tokens"])) for s in shards])
    assert stream.num_tokens == len(everything)
    tokens, mask, cats = stream.read(19990, 25)  # crosses the first boundary
    assert np.array_equal(tokens, everything[19990:20015])
    tokens, _, _ = stream.read(len(everything) - 5, 10)  # wraps to the start: the next epoch
    assert np.array_equal(tokens, np.concatenate([everything[-5:], everything[:5]]))


def test_loader_state_round_trip_mid_shard_and_across_boundary(small_shards):
    straight = make_loader(small_shards)
    for _ in range(3):
        straight.next_step()
    state = straight.state_dict()
    expected = [straight.next_step() for _ in range(60)]  # 60 x 1024 tokens crosses several shard boundaries
    resumed = make_loader(small_shards)
    resumed.load_state_dict(state)
    for (batches, n), (batches2, n2) in zip(expected, (resumed.next_step() for _ in range(60))):
        assert n == n2
        for (x, y), (x2, y2) in zip(batches, batches2):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_ranks_read_distinct_parts_of_the_same_step(small_shards):
    one = make_loader(small_shards, grad_accum=4)
    two = [make_loader(small_shards, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    batches, n = one.next_step()
    parts = [loader.next_step() for loader in two]
    assert n == parts[0][1] == parts[1][1]  # every rank knows the whole step's target count
    rows = lambda bs: sorted(tuple(r.tolist()) for x, _ in bs for r in x)
    assert rows(batches) == rows(parts[0][0] + parts[1][0])
    assert not set(rows(parts[0][0])) & set(rows(parts[1][0]))
    assert one.state_dict()["position"] == two[0].state_dict()["position"]


def test_response_targets_are_masked(small_shards):
    loader = make_loader(small_shards, loss_on="response")
    batches, n = loader.next_step()
    ys = torch.cat([y.flatten() for _, y in batches])
    assert 0 < (ys != fd.IGNORE_INDEX).sum() == n < ys.numel()
    loader_all = make_loader(small_shards, loss_on="all")
    batches, n = loader_all.next_step()
    assert n == 2 * 4 * 64 and all((y != fd.IGNORE_INDEX).all() for _, y in batches)


def test_val_batches_use_every_target_exactly_once(data_dir):
    manifest = fd.load_manifest(data_dir)
    stream = fd.TokenStream(data_dir, "val", manifest)
    for max_tokens in (0, 1000):
        n_pred = stream.num_tokens - 1 if max_tokens == 0 else max_tokens
        targets = []
        for rank in range(3):
            for x, y, c in fd.val_batches(stream, 4, 64, max_tokens, "all", rank, 3):
                targets.append(y[y != fd.IGNORE_INDEX])
        targets = torch.cat(targets)
        assert targets.numel() == n_pred
        tokens, _, _ = stream.read(1, n_pred)
        assert sorted(targets.tolist()) == sorted(tokens.astype(int).tolist())


# ---------------------------------------------------------------- config and CLI

def test_validate_config_lists_every_problem():
    cfg = fd.TrainConfig(max_lr=0, batch_size=3, sequence_length=100, keep_last_n_checkpoints=0, loss_on="prompt")
    with pytest.raises(fd.UserError) as e:
        fd.validate_config(cfg, world_size=2)
    msg = str(e.value)
    for needle in ("--max_lr must be > 0", "--keep_last_n_checkpoints", "--loss_on", "valid --batch_size values"):
        assert needle in msg
    fd.validate_config(fd.TrainConfig())  # the guide's defaults are valid


def test_cli_lists_invalid_values_in_one_error(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path / "log", "--max_lr", "-1", "--batch_size", "3", "--warmup_steps", "-2")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "--max_lr must be > 0" in r.stderr and "--warmup_steps" in r.stderr and "valid --batch_size" in r.stderr
    assert not os.path.exists(tmp_path / "log" / "metrics.jsonl")


@pytest.mark.parametrize("flags, needle", [
    (("--total_batch_size", "0"), "--total_batch_size must be >= 1"),
    (("--total_batch_size", "-256"), "--total_batch_size must be >= 1"),
    (("--n_layer", "0"), "--n_layer, --n_embd and --block_size must be >= 1"),
    (("--n_embd", "-16", "--n_head", "1"), "--n_layer, --n_embd and --block_size must be >= 1"),
    # --auto_resume with nothing to resume: checked as a first launch
    (("--auto_resume", "--n_embd", "-16", "--n_head", "1"), "--n_layer, --n_embd and --block_size must be >= 1"),
    (("--max_lr", "inf"), "--max_lr inf: must be a finite number"),
    (("--num_epochs", "nan"), "--num_epochs nan: must be a finite number"),
    (("--generate_max_tokens", "0"), "--generate_max_tokens must be >= 1"),
    (("--dist_timeout_min", "-1"), "--dist_timeout_min must be >= 1"),
])
def test_nonsensical_values_are_refused_before_anything_runs(data_dir, tmp_path, flags, needle):
    r = run_trainer(data_dir, tmp_path / "log", *flags)
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "log" / "metrics.jsonl")


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def overwrite(text):
    def damage(path):
        with open(path, "wb") as f:
            f.write(text)
    return damage


def npz_under_npy_name(path):
    np.savez(path + ".npz", tokens=np.arange(4))
    os.replace(path + ".npz", path)


def drop_splits(path):
    with open(path) as f:
        manifest = json.load(f)
    del manifest["splits"]
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("name, damage", [
    ("dolly_train_000000.npy", truncate),
    ("dolly_train_000000.npy", overwrite(bytes(range(256)) * 16)),
    ("dolly_val_mask_000000.npy", os.remove),
    ("dolly_val_category_000000.npy", overwrite(b"")),
    ("dolly_train_000000.npy", npz_under_npy_name),
    ("dolly_val_000000.npy", lambda path: np.save(path, np.uint16(7))),  # a 0-d array
    ("manifest.json", overwrite(b'{"format_version": 1, bad')),
    ("manifest.json", truncate),
    ("manifest.json", drop_splits),
])
def test_damaged_data_says_to_run_prepare_again(data_dir, tmp_path, name, damage):
    damaged = tmp_path / "data"
    shutil.copytree(data_dir, damaged)
    damage(str(damaged / name))
    r = run_trainer(damaged, tmp_path / "log", "--max_steps", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "python model/prepare_dolly.py" in r.stderr
    assert name in r.stderr and "pickle" not in r.stderr  # names the damaged file, in the project's words


def test_manifest_problem_names_the_missing_part(data_dir):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        intact = json.load(f)
    assert fd.manifest_problem(intact) is None
    cases = [(lambda m: m.pop("seed"), "no seed"),
             (lambda m: m["splits"].pop("val"), "no complete val split"),
             (lambda m: m["splits"]["train"].update(tokens="12"), "no complete train split"),
             (lambda m: m["splits"]["val"]["shards"][0].pop("mask"), "a val shard entry is incomplete"),
             (lambda m: m["splits"]["train"].update(shards=None), "a train shard entry is incomplete"),
             (lambda m: m.update(splits=[]), "no complete train split")]
    for damage, expected in cases:
        manifest = json.loads(json.dumps(intact))
        damage(manifest)
        assert fd.manifest_problem(manifest) == expected


def test_missing_data_dir_says_to_run_prepare(tmp_path):
    r = run_trainer(tmp_path / "nothing", tmp_path / "log")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "python model/prepare_dolly.py" in r.stderr


def test_sequence_longer_than_block_size_is_refused(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path / "log", "--sequence_length", "128", "--total_batch_size", "1024")
    assert r.returncode == 1 and "block_size" in r.stderr


def test_fresh_run_will_not_overwrite_an_earlier_run(data_dir, tmp_path):
    log = tmp_path / "log"
    assert run_trainer(data_dir, log, "--max_steps", "2").returncode == 0
    r = run_trainer(data_dir, log, "--max_steps", "2")
    assert r.returncode == 1 and "--auto_resume" in r.stderr


# ---------------------------------------------------------------- whole runs

def test_loss_falls_and_same_seed_gives_same_metrics(data_dir, tmp_path):
    args = ("--max_steps", "10", "--eval_interval", "5", "--max_lr", "3e-3", "--warmup_steps", "2")
    a = run_trainer(data_dir, tmp_path / "a", *args)
    b = run_trainer(data_dir, tmp_path / "b", *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert ma == mb
    assert [m["step"] for m in ma] == list(range(0, 11))
    val = [m["val_loss"] for m in ma if "val_loss" in m]
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[2] < val[0] - 0.2
    assert ma[-1]["train_loss"] < ma[1]["train_loss"]
    for key in ("train_loss", "lr", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in ma[1:])


def test_num_epochs_sets_max_steps_from_data(data_dir, tmp_path):
    manifest = fd.load_manifest(data_dir)
    r = run_trainer(data_dir, tmp_path / "log", "--num_epochs", "0.01", "--eval_interval", "1000")
    assert r.returncode == 0, r.stderr
    expected = math.ceil(0.01 * manifest["splits"]["train"]["tokens"] / 1024)
    assert read_metrics(tmp_path / "log")[-1]["step"] == expected


def test_guide_warnings_for_out_of_guide_settings(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path / "log", "--max_steps", "1", "--weight_decay", "0", "--batch_size", "2",
                    "--total_batch_size", "128")
    assert r.returncode == 0, r.stderr
    for needle in ("--max_lr 0.001 is high", "--weight_decay 0", "--batch_size 2 is outside"):
        assert needle in r.stdout


# ---------------------------------------------------------------- what the user sees

def test_startup_summary_numbers(data_dir, tmp_path):
    manifest = fd.load_manifest(data_dir)
    r = run_trainer(data_dir, tmp_path / "log", "--max_steps", "1", "--total_batch_size", "2048")
    assert r.returncode == 0, r.stderr
    train_tokens = manifest["splits"]["train"]["tokens"]
    assert f"{train_tokens:,} train tokens" in r.stdout
    assert "2,048 tokens/step = 4 x 64 x 8 accum x 1 procs" in r.stdout
    assert f"{train_tokens / 2048:.2f} steps/epoch | 1 steps = {1 / (train_tokens / 2048):.2f} epochs" in r.stdout
    assert "fresh start from random" in r.stdout
    # plain lines, no progress bar, when stdout is not a terminal
    assert "\r" not in r.stdout and "loss=" not in r.stdout


def test_progress_bar_on_a_terminal(data_dir, tmp_path):
    import pty
    import subprocess
    from conftest import ROOT, trainer_cmd
    master, slave = pty.openpty()
    proc = subprocess.Popen(trainer_cmd(data_dir, tmp_path / "log", "--max_steps", "2"), cwd=ROOT, stdout=slave,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0
    text = out.decode(errors="replace")
    assert "2/2" in text and "loss=" in text and "tok_s=" in text  # tqdm's bar with its postfix


def test_per_category_val_losses_add_up_to_the_overall_loss(data_dir):
    manifest = fd.load_manifest(data_dir)
    stream = fd.TokenStream(data_dir, "val", manifest)
    cfg = fd.TrainConfig(batch_size=4, sequence_length=32, val_tokens=0)
    model = tiny_model()
    n_cat = len(manifest["categories"])
    val_loss, per_cat = fd.evaluate(model, stream, cfg, 0, 1, "cpu", fd.nullcontext(), n_cat)
    counts = torch.zeros(n_cat)
    for _, y, c in fd.val_batches(stream, 4, 32, 0, "response", 0, 1):
        counts += torch.bincount(c[y != fd.IGNORE_INDEX], minlength=n_cat)
    assert (counts > 0).sum() == n_cat  # every category has val targets
    weighted = sum(loss * n for loss, n in zip(per_cat, counts.tolist())) / counts.sum().item()
    assert weighted == pytest.approx(val_loss, rel=1e-6)


@pytest.mark.parametrize("eval_rows", [fd.EVAL_ROWS, 50])
def test_val_loss_equals_full_logits_cross_entropy(data_dir, monkeypatch, eval_rows):
    """evaluate() gathers the target positions' hidden states over batches (here also in groups of ~50 rows) before the
    output layer: the same token-weighted loss as full logits and F.cross_entropy, batch by batch."""
    monkeypatch.setattr(fd, "EVAL_ROWS", eval_rows)
    manifest = fd.load_manifest(data_dir)
    stream = fd.TokenStream(data_dir, "val", manifest)
    cfg = fd.TrainConfig(batch_size=4, sequence_length=32, val_tokens=0)
    model = tiny_model()
    val_loss, _ = fd.evaluate(model, stream, cfg, 0, 1, "cpu", fd.nullcontext(), len(manifest["categories"]))
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, _ in fd.val_batches(stream, 4, 32, 0, "response", 0, 1):
            logits, _ = model(x)
            loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=fd.IGNORE_INDEX,
                                       reduction="sum")
            total += loss_sum.item()
            count += int((y != fd.IGNORE_INDEX).sum())
    assert count > 2 * 50 and val_loss == pytest.approx(total / count, rel=1e-6)
    assert model.training  # evaluate() puts the model back in training mode


def test_compile_gives_the_same_losses_without_recompiling_every_step(data_dir, tmp_path):
    """--compile is the default on CUDA; it compiles the transformer body only, since the number of target
    positions changes every batch (a compiled whole model recompiled at every step)."""
    args = ("--max_steps", "4", "--eval_interval", "2", "--total_batch_size", "512")
    eager = run_trainer(data_dir, tmp_path / "eager", *args, "--compile", "off")
    compiled = run_trainer(data_dir, tmp_path / "compiled", *args, "--compile", "on")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    for a, b in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4)
    assert "Recompiling" not in compiled.stderr


def test_guide_warns_past_about_one_epoch():
    cfg = fd.TrainConfig(max_steps=6)  # the guide's default, ~1.1-1.2 epochs of Dolly-15k: no warning
    assert not fd.guide_warnings(cfg, steps_per_epoch=5.3)
    warnings = fd.guide_warnings(fd.TrainConfig(max_steps=12), steps_per_epoch=5.3)
    assert len(warnings) == 1 and "2.26 epochs" in warnings[0]


# ---------------------------------------------------------------- --config FILE

def test_config_file_values_count_as_given_and_the_command_line_wins(root, tmp_path):
    """A --config value is a value the user gave: on resume it wins over the checkpoint's, like a flag; a flag on
    the command line wins over the file."""
    cfg, given = fd.parse_args(["--config", os.path.join(root, "config", "quickstart.json"), "--max_steps", "40"])
    with open(os.path.join(root, "config", "quickstart.json")) as f:
        from_file = json.load(f)
    assert cfg.max_steps == 40 and cfg.n_layer == from_file["n_layer"] and cfg.max_lr == from_file["max_lr"]
    assert set(from_file) <= given and "max_steps" in given and "seed" not in given
    path = tmp_path / "c.json"
    path.write_text('{"max_lr": 1, "auto_resume": true}')  # an int for a float flag; a switch
    cfg, given = fd.parse_args(["--config", str(path)])
    assert cfg.max_lr == 1.0 and isinstance(cfg.max_lr, float) and cfg.auto_resume
    assert given == {"max_lr", "auto_resume"}
    cfg, given = fd.parse_args(["--config", str(path), "--no-auto_resume"])  # a switch the file turned on, off
    assert not cfg.auto_resume and "auto_resume" in given


@pytest.mark.parametrize("text,message", [("{\"max_step\": 3}", "unknown setting 'max_step'"),
                                          ("{\"max_steps\": \"3\"}", "max_steps must be int, got \"3\""),
                                          ("{\"fsdp\": 1}", "fsdp must be bool, got 1"),
                                          ("[1, 2]", "expected a JSON object"), ("{max_steps: 3", "not valid JSON"),
                                          (None, "cannot read it")])
def test_a_bad_config_file_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "c.json"
    if text is not None:
        path.write_text(text)
    r = run_trainer(tmp_path, tmp_path / "log", "--config", str(path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "log").exists()
