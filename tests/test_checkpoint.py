"""Checkpoints and resume: atomic saves, rotation, SIGKILL/SIGTERM then --auto_resume == an uninterrupted run."""
import errno
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

import finetune_dolly as fd
from conftest import PYTHON, ROOT, prepare, read_metrics, run_trainer, trainer_cmd


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"trainer exited early: {proc.communicate()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def metrics_step(log_dir):
    try:
        return max(m["step"] for m in read_metrics(log_dir))
    except (OSError, ValueError):
        return -1


def start_trainer(data_dir, log_dir, *extra):
    return subprocess.Popen(trainer_cmd(data_dir, log_dir, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def final_weights(log_dir, step=6):
    return torch.load(os.path.join(log_dir, fd.checkpoint_name(step)), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 6-step run: what every interrupted + resumed run must reproduce bit for bit."""
    log = tmp_path_factory.mktemp("reference")
    r = run_trainer(data_dir, log)
    assert r.returncode == 0, r.stderr
    return log


# ---------------------------------------------------------------- pure helpers

def test_rotation_keeps_the_newest_and_sorts_numerically(tmp_path):
    for step in (1, 2, 3, 4, 5, 9, 10):
        (tmp_path / fd.checkpoint_name(step)).write_bytes(b"x")
    (tmp_path / "model_best.pt").write_bytes(b"x")
    (tmp_path / "notes.pt").write_bytes(b"x")
    assert [s for s, _ in fd.list_checkpoints(tmp_path)] == [1, 2, 3, 4, 5, 9, 10]
    fd.prune_checkpoints(tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["model_00009.pt", "model_00010.pt", "model_best.pt", "notes.pt"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        fd.prune_checkpoints(tmp_path, 0)
    (tmp_path / "model_100000.pt").write_bytes(b"x")  # past 5 digits still sorts by number
    fd.prune_checkpoints(tmp_path, 1)
    assert [s for s, _ in fd.list_checkpoints(tmp_path)] == [100000]


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model_00002.pt"
    fd.atomic_torch_save({"a": torch.ones(3)}, str(path))
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)  # half the bytes are on disk when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        fd.atomic_torch_save({"a": torch.zeros(3)}, str(path))
    assert os.listdir(tmp_path) == ["model_00002.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    fd.atomic_torch_save({"rng": fd.capture_rng_state()}, str(tmp_path / "r.pt"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fd.restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- the checkpoint file

def test_checkpoint_holds_the_full_state_and_loads_weights_only(reference):
    ckpt = torch.load(os.path.join(reference, "model_00006.pt"), weights_only=True)
    for key in ("model", "optimizer", "step", "val_loss", "train_loader_state", "rng", "config", "model_config",
                "init_source", "data_fingerprint", "best_val_loss", "format_version"):
        assert key in ckpt, key
    assert ckpt["step"] == 6 and ckpt["train_loader_state"]["position"] == 6 * 1024
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["init_source"] == "random"
    # rotation kept the newest three, best is kept apart
    best_path = os.path.join(reference, "model_best.pt")
    assert [s for s, _ in fd.list_checkpoints(reference)] == [2, 4, 6] and os.path.exists(best_path)
    best = torch.load(best_path, weights_only=True)
    assert best["val_loss"] == min(m["val_loss"] for m in read_metrics(reference) if "val_loss" in m)
    # best on a checkpoint step: the checkpoint's file under a second name (serialized once), not a second copy
    assert os.path.samefile(best_path, os.path.join(reference, fd.checkpoint_name(best["step"])))


def test_atomic_link_copies_where_there_are_no_hard_links(tmp_path, monkeypatch):
    src, dst = tmp_path / "model_00004.pt", tmp_path / "model_best.pt"
    src.write_bytes(b"new state")
    dst.write_bytes(b"old best")
    fd.atomic_link(str(src), str(dst))
    assert os.path.samefile(src, dst)
    src.unlink()  # rotation deletes the checkpoint: the best stays
    assert dst.read_bytes() == b"new state"

    def no_hard_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_hard_links)
    src.write_bytes(b"newer state")
    fd.atomic_link(str(src), str(dst))
    assert dst.read_bytes() == b"newer state" and not os.path.samefile(src, dst)
    assert sorted(os.listdir(tmp_path)) == ["model_00004.pt", "model_best.pt"]  # no temp file left


def test_rotation_in_a_run_keeps_exactly_the_last_n(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path, "--checkpoint_interval", "1", "--keep_last_n_checkpoints", "2")
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in fd.list_checkpoints(tmp_path)] == [5, 6]
    assert os.path.exists(tmp_path / "model_best.pt")


# ---------------------------------------------------------------- kill, stop, resume

@pytest.mark.parametrize("kill_after_step", [1, 3, 4])
def test_sigkill_then_auto_resume_equals_uninterrupted_run(data_dir, tmp_path, reference, kill_after_step):
    proc = start_trainer(data_dir, tmp_path)
    wait_for(lambda: metrics_step(tmp_path) >= kill_after_step, proc)
    proc.kill()
    proc.wait()
    r = run_trainer(data_dir, tmp_path, "--auto_resume")
    assert r.returncode == 0, r.stderr
    assert read_metrics(tmp_path) == read_metrics(reference)  # every step exactly once, same numbers
    assert_same_weights(final_weights(tmp_path), final_weights(reference))


def test_sigkill_during_a_save_then_auto_resume(data_dir, tmp_path):
    """A bigger model makes the save long enough to be caught half-written."""
    args = ("--n_embd", "256", "--n_head", "4", "--max_steps", "4", "--eval_interval", "100")
    ref = tmp_path / "ref"
    assert run_trainer(data_dir, ref, *args).returncode == 0
    log = tmp_path / "log"
    proc = start_trainer(data_dir, log, *args)
    temp = lambda: os.path.isdir(log) and any(".pt.tmp" in n for n in os.listdir(log))
    wait_for(temp, proc)
    proc.kill()
    proc.wait()
    r = run_trainer(data_dir, log, "--auto_resume", *args)
    assert r.returncode == 0, r.stderr
    assert not any(".tmp" in n for n in os.listdir(log))
    assert read_metrics(log) == read_metrics(ref)
    assert_same_weights(final_weights(log, 4), final_weights(ref, 4))


def test_temp_files_of_killed_writes_are_removed_at_the_next_start(data_dir, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    for name in ("model_00002.pt.tmp4242", "model_best.pt.tmp4242", "loss.png.tmp4242", "notes.tmp"):
        (log / name).write_bytes(b"half")
    (log / "hf.tmp4242").mkdir()  # a killed export's staging folder: not a file the trainer writes
    assert run_trainer(data_dir, log, "--max_steps", "1").returncode == 0
    assert sorted(name for name in os.listdir(log) if ".tmp" in name) == ["hf.tmp4242", "notes.tmp"]


def test_sigterm_saves_a_checkpoint_and_exits_75(data_dir, tmp_path, reference):
    proc = start_trainer(data_dir, tmp_path)
    wait_for(lambda: metrics_step(tmp_path) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == fd.EXIT_PREEMPTED, err
    stopped_at = metrics_step(tmp_path)
    if stopped_at < 6:
        assert os.path.exists(tmp_path / fd.checkpoint_name(stopped_at))
        assert "--auto_resume" in out
    r = run_trainer(data_dir, tmp_path, "--auto_resume")
    assert r.returncode == 0, r.stderr
    assert read_metrics(tmp_path) == read_metrics(reference)
    assert_same_weights(final_weights(tmp_path), final_weights(reference))


def test_truncated_and_empty_newest_checkpoints_are_skipped(data_dir, tmp_path, reference):
    log = tmp_path / "log"
    assert run_trainer(data_dir, log, "--max_steps", "6").returncode == 0
    os.remove(log / "model_00006.pt")
    data = (log / "model_00004.pt").read_bytes()
    (log / "model_00004.pt").write_bytes(data[: len(data) // 2])  # truncated
    (log / "model_00005.pt").write_bytes(b"")  # zero bytes
    r = run_trainer(data_dir, log, "--auto_resume")
    assert r.returncode == 0, r.stderr
    assert "skipping checkpoint" in r.stdout and "model_00005.pt: empty file" in r.stdout
    assert "model_00004.pt: unreadable" in r.stdout and "resuming from" in r.stdout and "model_00002.pt" in r.stdout
    assert read_metrics(log) == read_metrics(reference)
    assert_same_weights(final_weights(log), final_weights(reference))


def test_auto_resume_with_nothing_falls_back_or_fails_when_strict(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path / "a", "--auto_resume", "--max_steps", "1")
    assert r.returncode == 0 and "fresh start" in r.stdout
    r = run_trainer(data_dir, tmp_path / "b", "--auto_resume", "--strict_resume", "--max_steps", "1")
    assert r.returncode == 1 and "no loadable checkpoint" in r.stderr


def test_explicit_checkpoint_path_missing(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path, "--resume", "--checkpoint_path", str(tmp_path / "model_00100.pt"))
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def files_in(log_dir):
    """Every file of a log dir and its bytes (the run lock aside, which every start rewrites)."""
    return {name: (log_dir / name).read_bytes() for name in sorted(os.listdir(log_dir)) if name != ".lock"}


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def test_no_fresh_start_over_checkpoints_that_do_not_load(data_dir, tmp_path, reference):
    """The guide falls back to the pretrained model when no checkpoint loads, but a fresh run in that folder would
    overwrite the earlier run's files under the same names and its rotation would delete them: an error instead."""
    log = tmp_path / "log"
    shutil.copytree(reference, log)
    for _, path in fd.list_checkpoints(log):
        truncate(path)
    before = files_in(log)
    r = run_trainer(data_dir, log, "--auto_resume")
    assert r.returncode == 1 and "none of them loads" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert files_in(log) == before
    # a named checkpoint that does not load, beside others that do
    log = tmp_path / "named"
    shutil.copytree(reference, log)
    truncate(log / "model_00006.pt")
    before = files_in(log)
    r = run_trainer(data_dir, log, "--resume", "--checkpoint_path", str(log / "model_00006.pt"))
    assert r.returncode == 1 and "holds checkpoints of an earlier run" in r.stderr and "Traceback" not in r.stderr
    assert files_in(log) == before
    # where nothing can be overwritten, the guide's fallback: the pretrained model (here 'none': a random init)
    r = run_trainer(data_dir, tmp_path / "empty", "--resume", "--checkpoint_path", str(log / "model_00006.pt"),
                    "--max_steps", "1")
    assert r.returncode == 0 and "falling back to the pretrained model" in r.stdout and "fresh start" in r.stdout


def test_disk_full_during_a_save_stops_with_a_one_line_error(data_dir, tmp_path):
    """A file size limit (RLIMIT_FSIZE, 1 MiB) fails the save's writes as a full disk does: torch.save reports the
    short write as a RuntimeError, not an OSError. The earlier checkpoint stays as it was, no temp file is left."""
    import resource
    log = tmp_path / "log"
    assert run_trainer(data_dir, log, "--max_steps", "2").returncode == 0
    saved = (log / "model_00002.pt").read_bytes()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))

    r = subprocess.run(trainer_cmd(data_dir, log, "--auto_resume", "--max_steps", "4"), capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit_file_size)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "checkpoint save failed" in r.stderr and "MiB free there" in r.stdout
    assert (log / "model_00002.pt").read_bytes() == saved
    assert not any(".tmp" in name for name in os.listdir(log))


@pytest.mark.parametrize("max_lr, why", [("1e4", "gradient norm inf"),  # the loss or the norm turns inf or NaN
                                         ("1e39", "weights not finite")])  # a finite step's update overflows float32
def test_a_diverged_run_stops_and_saves_nothing_from_it(data_dir, tmp_path, max_lr, why):
    log = tmp_path / "log"
    r = run_trainer(data_dir, log, "--max_lr", max_lr, "--min_lr", "0", "--warmup_steps", "0",
                    "--checkpoint_interval", "1")
    assert r.returncode == 1 and "training diverged at step" in r.stderr and why in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    step = int(r.stderr.split("training diverged at step ")[1].split()[0])
    assert not (log / fd.checkpoint_name(step)).exists()
    saved = [path for _, path in fd.list_checkpoints(log)] + [log / "model_best.pt"] * (log / "model_best.pt").exists()
    for path in saved:
        assert all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True)["model"].values()), path


def test_count_nonfinite_finds_nan_and_inf_but_not_a_sum_that_overflows():
    model = fd.GPT(fd.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    assert fd.count_nonfinite(model) == 0
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)  # every element finite, their sum inf
        assert fd.count_nonfinite(model) == 0
        model.transformer.h[0].mlp.c_fc.bias[3] = float("nan")
        model.transformer.wpe.weight[1, 2] = -float("inf")
    assert fd.count_nonfinite(model) == 2


@pytest.mark.parametrize("saved_exit_code, expected", [(None, 128 + signal.SIGTERM),
                                                       (fd.EXIT_PREEMPTED, fd.EXIT_PREEMPTED)])
def test_a_second_signal_exits_with_the_runs_status_once_it_is_saved(saved_exit_code, expected):
    """After the stop's checkpoint is saved, the process may still take a few seconds to exit: a second SIGTERM
    then must not turn 75 ('saved, requeue me') into 143."""
    code = (f"import os, signal, sys, time; sys.path.insert(0, 'model'); import finetune_dolly as fd\n"
            f"stop = fd.StopSignal(); stop.REPEAT_WINDOW_S = 0\n"
            f"os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05); stop.saved_exit_code = {saved_exit_code}\n"
            f"os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    r = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == expected, r.stderr


def test_resume_overrides_flags_and_refuses_other_shape_or_data(data_dir, tmp_path, reference):
    ckpt = os.path.join(reference, "model_00004.pt")
    log = tmp_path / "log"
    r = run_trainer(data_dir, log, "--resume", "--checkpoint_path", ckpt, "--max_lr", "5e-4", "--max_steps", "5")
    assert r.returncode == 0, r.stderr
    assert "max_lr: 0.001 -> 0.0005" in r.stdout
    assert [m["step"] for m in read_metrics(log)] == [5]
    r = run_trainer(data_dir, tmp_path / "shape", "--resume", "--checkpoint_path", ckpt, "--n_layer", "3")
    assert r.returncode == 1 and "different model shape" in r.stderr and "n_layer 2 (checkpoint) vs 3" in r.stderr
    other = prepare(tmp_path / "other", "--seed", "7")
    r = run_trainer(other, tmp_path / "data", "--resume", "--checkpoint_path", ckpt)
    assert r.returncode == 1 and "other data" in r.stderr and "--allow_data_change" in r.stderr
    r = run_trainer(other, tmp_path / "data", "--resume", "--checkpoint_path", ckpt, "--allow_data_change")
    assert r.returncode == 0, r.stderr


def test_malicious_checkpoint_is_never_executed(data_dir, tmp_path, reference):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    log = tmp_path / "log"
    log.mkdir()
    good = torch.load(os.path.join(reference, "model_00004.pt"), weights_only=True)
    torch.save({**good, "step": 6, "payload": Evil()}, log / "model_00006.pt")
    torch.save(good, log / "model_00004.pt")
    r = run_trainer(data_dir, log, "--auto_resume")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert "refusing to load" in r.stdout and "resuming from" in r.stdout


def test_a_file_that_is_no_checkpoint_is_called_so(data_dir, tmp_path):
    r = run_trainer(data_dir, tmp_path / "log", "--pretrained_checkpoint", os.path.join(ROOT, "README.md"))
    assert r.returncode == 1 and "README.md: not a PyTorch checkpoint file" in r.stderr and "refusing" not in r.stderr


def test_two_runs_cannot_share_a_log_dir(data_dir, tmp_path):
    proc = start_trainer(data_dir, tmp_path, "--max_steps", "2000", "--eval_interval", "1000")
    try:
        wait_for(lambda: metrics_step(tmp_path) >= 1, proc)
        r = run_trainer(data_dir, tmp_path, "--auto_resume")
        assert r.returncode == 1 and "in use by a running fine-tune" in r.stderr and f"pid {proc.pid}" in r.stderr
    finally:
        proc.kill()
        proc.wait()
    # the killed run's lock is not stale: the next run takes it over
    r = run_trainer(data_dir, tmp_path, "--auto_resume", "--max_steps", "2")
    assert r.returncode == 0, r.stderr


def test_save_into_an_unwritable_log_dir_fails_cleanly(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_trainer(data_dir, blocker / "log")
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(data_dir, tmp_path, reference):
    """Resuming from model_00002.pt in a folder that holds 4 and 6: those are the abandoned future of the run.
    They are renamed out of rotation and auto-resume, so a later --auto_resume cannot jump back to them."""
    import shutil
    log = tmp_path / "log"
    shutil.copytree(reference, log)
    r = run_trainer(data_dir, log, "--resume", "--checkpoint_path", str(log / "model_00002.pt"), "--max_steps", "3")
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in fd.list_checkpoints(log)] == [2, 3]
    assert os.path.exists(log / "model_00004.pt.superseded") and os.path.exists(log / "model_00006.pt.superseded")
    assert [m["step"] for m in read_metrics(log)] == [0, 1, 2, 3]
    # the best of that future goes with it: the tools (chat, eval, export) must not pick a discarded model
    assert fd.load_checkpoint(log / "model_best.pt.superseded")["step"] > 2
    assert not os.path.exists(log / "model_best.pt") or fd.load_checkpoint(log / "model_best.pt")["step"] <= 3


def test_a_fresh_start_will_not_overwrite_a_lone_best_checkpoint(data_dir, tmp_path, reference):
    """A log dir that kept only model_best.pt (the others deleted to save space) still holds an earlier run."""
    import shutil
    log = tmp_path / "log"
    log.mkdir()
    shutil.copy(reference / "model_best.pt", log / "model_best.pt")
    for extra in ((), ("--auto_resume",)):
        r = run_trainer(data_dir, log, "--max_steps", "1", *extra)
        assert r.returncode == 1 and "holds model_best.pt of an earlier run" in r.stderr, r.stderr
    assert sorted(os.listdir(log)) == [".lock", "model_best.pt"]


def test_resume_with_max_steps_extends_a_num_epochs_run(data_dir, tmp_path):
    """--max_steps given on resume wins over the checkpoint's --num_epochs, which would set the steps again."""
    log = tmp_path / "log"
    assert run_trainer(data_dir, log, "--num_epochs", "0.005", "--max_steps", "1").returncode == 0
    assert max(m["step"] for m in read_metrics(log)) == 2  # 0.005 epochs of 254.6 steps per epoch
    r = run_trainer(data_dir, log, "--auto_resume", "--max_steps", "3")
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(log)] == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [("--sequence_length", "128"), ("--allow_data_change", "--data_dir", "DAMAGED")])
def test_a_resume_that_fails_at_start_up_sets_nothing_aside(data_dir, tmp_path, reference, bad):
    """The newer checkpoints are renamed only once the start-up checks have passed: a resume that then fails
    (a sequence longer than the model's block_size, a damaged shard) leaves the log dir as it was."""
    import shutil
    log, damaged = tmp_path / "log", tmp_path / "data"
    shutil.copytree(reference, log)
    shutil.copytree(data_dir, damaged)
    (damaged / "dolly_train_000000.npy").write_bytes(b"")
    before = sorted(os.listdir(log))
    r = run_trainer(data_dir, log, "--resume", "--checkpoint_path", str(log / "model_00002.pt"),
                    *[str(damaged) if a == "DAMAGED" else a for a in bad])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(log)) == before


def test_half_written_metrics_line_does_not_block_resume(data_dir, tmp_path, reference):
    """A kill during a metrics write leaves a partial last line; --auto_resume must still work."""
    import shutil
    log = tmp_path / "log"
    shutil.copytree(reference, log)
    os.remove(log / "model_00006.pt")
    with open(log / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tr')
    r = run_trainer(data_dir, log, "--auto_resume")
    assert r.returncode == 0, r.stderr
    assert read_metrics(log) == read_metrics(reference)
