"""Silent corruption caught before use: a flipped byte in a checkpoint (its zip records' CRC-32s), a shard whose bytes
changed (manifest.json's sha256s) or that holds token ids beyond the vocabulary."""
import hashlib
import json
import os
import shutil
import zipfile
import zlib

import numpy as np
import pytest
import torch

import chat
import finetune_dolly as fd
from conftest import read_metrics, run_trainer


def flip_byte(path, record=None):
    """Flips one bit in the middle of a record's bytes (by default the largest: a weight or its AdamW state), the
    way a bad disk or copy would; the file keeps its size and its zip structure. Returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(record) if record else max(archive.infolist(), key=lambda i: i.compress_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        offset = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    return info.filename


@pytest.fixture(scope="module")
def run4(data_dir, tmp_path_factory):
    """A 4-step tiny run (checkpoints at steps 2 and 4) and an uninterrupted 6-step one to compare a resume with."""
    base = tmp_path_factory.mktemp("integrity")
    for steps in (4, 6):
        r = run_trainer(data_dir, base / f"steps{steps}", "--max_steps", str(steps), "--min_lr", "1e-3")
        assert r.returncode == 0, r.stderr
    return base


def test_a_flipped_byte_is_named_and_a_clean_file_passes(run4, tmp_path):
    path = str(tmp_path / "model.pt")
    shutil.copy(run4 / "steps4" / "model_00004.pt", path)
    assert fd.damaged_records(path) == []
    record = flip_byte(path)
    assert fd.damaged_records(path) == [record]
    torch.load(path, weights_only=True)  # what torch.load alone does: no error, wrong weights
    with pytest.raises(fd.UserError, match=f"damaged: record {record} does not match the CRC-32"):
        fd.load_checkpoint(path)


def test_the_check_computes_zips_crc32(run4, tmp_path, monkeypatch):
    """fd.crc32 (zlib-ng's when installed) is the zip archive's CRC-32; with the standard library's (an install
    without zlib-ng) the check names the same record."""
    data = os.urandom(3 << 20)
    assert fd.crc32(data) == zlib.crc32(data) and fd.crc32(data[1:]) == zlib.crc32(data[1:])
    path = str(tmp_path / "model.pt")
    shutil.copy(run4 / "steps4" / "model_00004.pt", path)
    with zipfile.ZipFile(path) as archive:  # a small record: a weight's, or its AdamW state's
        small = min((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
    record = flip_byte(path, small.filename)
    assert fd.damaged_records(path) == [record]
    monkeypatch.setattr(fd, "crc32", zlib.crc32)
    assert fd.damaged_records(path) == [record]


def test_auto_resume_skips_a_flipped_newest_checkpoint(run4, data_dir, tmp_path):
    log = tmp_path / "log"
    shutil.copytree(run4 / "steps4", log)
    flip_byte(log / "model_00004.pt")
    r = run_trainer(data_dir, log, "--auto_resume", "--max_steps", "6", "--min_lr", "1e-3")
    assert r.returncode == 0, r.stderr
    assert f"WARNING: skipping {log / 'model_00004.pt'}: damaged" in r.stdout and "Traceback" not in r.stderr
    assert "resuming from" in r.stdout and "model_00002.pt at step 2" in r.stdout
    assert read_metrics(log) == read_metrics(run4 / "steps6")  # steps 3..6 redone from the good checkpoint


def test_an_explicit_damaged_checkpoint_is_a_one_line_error(run4, data_dir, tmp_path):
    log = tmp_path / "log"
    shutil.copytree(run4 / "steps4", log)
    flip_byte(log / "model_00002.pt")
    r = run_trainer(data_dir, log, "--resume", "--checkpoint_path", str(log / "model_00002.pt"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "damaged" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # the tools refuse it the same way
    assert chat.main(["--checkpoint", str(log / "model_00002.pt"), "--prompt", "hi"]) == 1


def test_a_damaged_best_checkpoint_hands_over_to_the_newest(run4, tmp_path, capsys):
    """model_best.pt is a hard link of the checkpoint of its step; damaged, the tools take the newest that loads."""
    log = tmp_path / "log"
    shutil.copytree(run4 / "steps4", log)
    assert os.path.samefile(run4 / "steps4" / "model_best.pt", run4 / "steps4" / "model_00004.pt")
    os.remove(log / "model_best.pt")
    os.link(log / "model_00004.pt", log / "model_best.pt")  # as the run left it (copytree made a second file)
    path, _ = fd.pick_checkpoint(str(log))
    assert path == str(log / "model_best.pt")
    flip_byte(log / "model_best.pt")  # and so model_00004.pt
    path, ckpt = fd.pick_checkpoint(str(log))
    assert path == str(log / "model_00002.pt") and ckpt["step"] == 2
    warnings = capsys.readouterr().out.splitlines()
    assert [w.split(": damaged: ")[0] for w in warnings] == [f"WARNING: skipping {log / name}"
                                                              for name in ("model_best.pt", "model_00004.pt")]


# ---------------------------------------------------------------- shards

@pytest.fixture()
def data_copy(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def overwrite_second_half(path, value):
    """Token ids beyond the vocabulary over the second half of a shard: same size, so its manifest entry still fits."""
    array = np.load(path)
    array[len(array) // 2:] = value
    with open(path, "r+b") as f:  # in place, keeping the .npy header
        f.seek(os.path.getsize(path) - array.nbytes)
        f.write(array.tobytes())


def test_prepare_records_each_shards_sha256(data_dir):
    manifest = fd.load_manifest(data_dir)
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            for kind in ("tokens", "mask", "category"):
                with open(os.path.join(data_dir, shard[kind]), "rb") as f:
                    assert hashlib.file_digest(f, "sha256").hexdigest() == shard["sha256"][kind]


@pytest.mark.parametrize("checksums", [True, False], ids=["sha256", "old_manifest"])
def test_a_damaged_shard_is_refused_before_the_first_step(data_copy, tmp_path, checksums):
    """Checksums catch it; without them (a manifest from before they existed) the token ids beyond the vocabulary
    do, at start-up, not when the loader reaches them steps later."""
    manifest = fd.load_manifest(data_copy)
    shard = data_copy / manifest["splits"]["train"]["shards"][0]["tokens"]
    overwrite_second_half(shard, 60000)
    if not checksums:
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                del entry["sha256"]
        (data_copy / "manifest.json").write_text(json.dumps(manifest))
    log = tmp_path / "log"
    r = run_trainer(data_copy, log, "--max_steps", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {shard}: ") and r.stderr.count("\n") == 1
    assert ("sha256 does not match" if checksums else "token id 60000 at position") in r.stderr
    assert "re-run `python model/prepare_dolly.py`" in r.stderr
    assert not (log / "metrics.jsonl").exists() or not read_metrics(log)  # not one step
    if not checksums:
        assert "has no shard checksums" in r.stdout
