"""The GPT-2 model of model/finetune_dolly.py: loading (Hub layout, build-nanogpt files, bare state dicts, unsafe
pickles, mismatched weights), the chunked loss against the plain one, and generation (KV cache, EOT, padding ids,
seeded sampling). Tiny models on CPU in fp32; no downloads."""

import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import finetune_dolly as fd
from conftest import write_nanogpt_checkpoints

EOT = 50256  # <|endoftext|>
PADDED_VOCAB = 50304  # build-nanogpt's vocab_size (50257 rounded up to a multiple of 128)


def tiny_gpt(seed=0, vocab_size=PADDED_VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=64, std=None):
    """A tiny random GPT. std: redraw every parameter from N(0, std), so attention and the LayerNorms do real work
    (GPT-2's init gives near-uniform attention and near-zero logits, which hide position and cache bugs)."""
    torch.manual_seed(seed)
    config = fd.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = fd.GPT(config)
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, std)
    return model.eval()


def cfg_for(path, **kw):
    return fd.TrainConfig(pretrained_checkpoint=str(path), **kw)


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are fastest on one thread: more threads only add synchronisation, and on a shared, loaded
    machine they wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# 1. the Hugging Face layout: same logits as transformers' GPT2LMHeadModel

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(config)
    # nonzero biases, non-unit LayerNorms, larger weights: a missed transpose or a wrong GELU shows
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.2)
    hf.eval()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(str(path), safe_serialization=True)
    return path, hf


def test_from_pretrained_matches_transformers_logits(hf_dir):
    path, hf = hf_dir
    model = fd.GPT.from_pretrained(str(path)).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 2, 32, 64, 50257)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = model(idx)
    assert want.abs().max() > 1.0  # the check below means something
    assert (got - want).abs().max().item() <= 1e-4


def test_load_pretrained_hub_dir(hf_dir):
    path, hf = hf_dir
    model, source = fd.load_pretrained(cfg_for(path))
    assert source == f"hub:{path}"
    assert torch.equal(model.transformer.wpe.weight, hf.transformer.wpe.weight)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading


def test_hub_dir_without_weights_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(fd.UserError, match="expected config.json and model.safetensors"):
        fd.load_pretrained(cfg_for(tmp_path))


# -----------------------------------------------------------------------------
# 2. build-nanogpt's train_gpt2.py checkpoints: {'model', 'config': __main__.GPTConfig, 'step', 'val_loss'}

@pytest.fixture(scope="module")
def nanogpt_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("nanogpt")
    reference = tiny_gpt(seed=3, vocab_size=50304, n_embd=16, block_size=32)
    write_nanogpt_checkpoints(reference.state_dict(), out)
    return out, reference


@pytest.mark.parametrize("name", ["_orig_mod", "module", "mask"])
def test_load_build_nanogpt_checkpoint(nanogpt_files, name):
    out, reference = nanogpt_files
    model, source = fd.load_pretrained(cfg_for(out / f"{name}.pt", n_layer=12, n_head=12, n_embd=768, vocab_size=50257))
    # the shape comes from the pickled GPTConfig (n_head 2 cannot be read off the tensors), not from the flags
    assert model.config == fd.GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)
    assert_same_weights(model, reference)
    assert model.lm_head.weight is model.transformer.wte.weight
    step = 5000 if name == "mask" else 19072
    assert source == f"pretrained:{out / f'{name}.pt'}, pretrained step {step}"


def test_load_bare_state_dict_infers_shape(tmp_path):
    reference = tiny_gpt(seed=4, vocab_size=50304, n_layer=3, n_head=2, n_embd=128, block_size=48)
    path = tmp_path / "bare.pt"
    torch.save({"_orig_mod." + k: v for k, v in reference.state_dict().items()}, path)
    model, source = fd.load_pretrained(cfg_for(path))
    # n_head read as n_embd // 64: GPT-2's heads are 64 wide
    assert model.config == fd.GPTConfig(block_size=48, vocab_size=50304, n_layer=3, n_head=2, n_embd=128)
    assert_same_weights(model, reference)
    assert source == f"pretrained:{path}"  # no step in a bare state dict


def test_not_a_gpt2_state_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(fd.UserError, match=r"not a GPT-2 state dict"):
        fd.load_pretrained(cfg_for(path))


# -----------------------------------------------------------------------------
# 3. a pickle that runs code is refused before it runs

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"transformer.wte.weight": torch.zeros(2, 2)}, "config": _Evil(marker), "step": 1}, path)
    return path, marker


def test_malicious_pickle_is_refused(evil_checkpoint):
    path, marker = evil_checkpoint
    with pytest.raises(fd.UserError, match="refusing to load"):
        fd.load_pretrained(cfg_for(path))
    assert not marker.exists()


def test_malicious_pickle_is_refused_by_the_cli(root, evil_checkpoint, data_dir, tmp_path):
    path, marker = evil_checkpoint
    cmd = [sys.executable, os.path.join(root, "model", "finetune_dolly.py"), "--pretrained_checkpoint", str(path),
           "--data_dir", str(data_dir), "--log_dir", str(tmp_path / "logs"), "--device", "cpu", "--compile", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "refusing to load" in errors[0] and "only load files you trust" in errors[0], proc.stderr
    assert not marker.exists()


# -----------------------------------------------------------------------------
# 4. weights that do not fit the model: the error names the key

def write_with_config(path, sd, config):
    torch.save({"model": sd, "model_config": vars(config), "step": 7}, path)


def test_wrong_shape_names_the_key(tmp_path):
    reference = tiny_gpt(seed=5, vocab_size=50304, n_embd=16, block_size=32)
    sd = reference.state_dict()
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(63, 16)
    write_with_config(tmp_path / "bad.pt", sd, reference.config)
    expected = r"transformer\.h\.1\.mlp\.c_fc\.weight: checkpoint \(63, 16\) vs model \(64, 16\)"
    with pytest.raises(fd.UserError, match=expected):
        fd.load_pretrained(cfg_for(tmp_path / "bad.pt"))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    reference = tiny_gpt(seed=5, vocab_size=50304, n_embd=16, block_size=32)
    sd = reference.state_dict()
    del sd["transformer.h.0.ln_2.bias"]
    write_with_config(tmp_path / "missing.pt", sd, reference.config)
    with pytest.raises(fd.UserError, match=r"missing keys \['transformer\.h\.0\.ln_2\.bias'\]"):
        fd.load_pretrained(cfg_for(tmp_path / "missing.pt"))
    # a third layer the config lacks
    sd = dict(reference.state_dict(), **{"transformer.h.2.ln_1.weight": torch.ones(16)})
    write_with_config(tmp_path / "extra.pt", sd, reference.config)
    with pytest.raises(fd.UserError, match=r"unexpected keys \['transformer\.h\.2\.ln_1\.weight'\]"):
        fd.load_pretrained(cfg_for(tmp_path / "extra.pt"))


def test_load_state_dict_checked_leaves_the_model_alone_on_error():
    model = tiny_gpt(seed=6, vocab_size=50304, n_embd=16, block_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    sd["transformer.wpe.weight"] = torch.zeros(16, 16)
    with pytest.raises(fd.UserError, match=r"transformer\.wpe\.weight"):
        fd.load_state_dict_checked(model, sd, "test")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -----------------------------------------------------------------------------
# 5. the chunked loss equals the plain one, value and gradients

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_target_cross_entropy_matches_plain(reduction):
    V, C, N = 50304, 8, 400  # 2**24 // V = 333 rows per chunk: two chunks, the second one short
    assert 2 ** 24 // V < N
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)

    def value_and_grads(loss_fn, dtype):
        h, w = h0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_()
        loss = loss_fn(h, w)
        (loss * 1.7).backward()  # a non-unit upstream gradient
        return loss.detach(), h.grad, w.grad

    ours = value_and_grads(lambda h, w: fd.target_cross_entropy(h, w, t, reduction), torch.float32)
    plain = value_and_grads(lambda h, w: F.cross_entropy(h @ w.t(), t, reduction=reduction), torch.float32)
    exact = value_and_grads(lambda h, w: F.cross_entropy(h @ w.t(), t, reduction=reduction), torch.float64)
    for name, a, b, c in zip(("loss", "grad h", "grad weight"), ours, plain, exact):
        scale = c.abs().max().item()
        # fp32 rounding: dL/dh sums 50,304 terms of softmax x weight, so both fp32 versions are off by ~3e-5 of its max
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=name)
        err_ours, err_plain = ((x.double() - c).abs().max().item() / scale for x in (a, b))
        assert err_ours <= 2 * err_plain + 1e-7, (name, err_ours, err_plain)  # as close to exact as the plain fp32 one
    with torch.no_grad():  # the no-grad path (evaluation) gives the same value, and per-row losses
        torch.testing.assert_close(fd.target_cross_entropy(h0, w0, t, reduction), plain[0], rtol=1e-5, atol=0)
        per_row = F.cross_entropy(h0 @ w0.t(), t, reduction="none")
        torch.testing.assert_close(fd.target_cross_entropy(h0, w0, t, "none"), per_row, rtol=1e-5, atol=1e-6)


def test_target_cross_entropy_under_bf16_autocast():
    """Under autocast the hidden states are bf16 and the weight fp32: the chunks' weight gradients (bf16 products)
    are summed into one fp32 gradient. Two chunks; bf16 precision against the fp32 computation."""
    V, C, N = 50304, 8, 400
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    grads = []
    for dtype in (torch.bfloat16, torch.float32):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fd.target_cross_entropy(h.to(dtype), w, t)
        loss.backward()
        assert w.grad.dtype == torch.float32
        grads.append((loss.detach(), h.grad, w.grad))
    for name, a, b in zip(("loss", "grad h", "grad weight"), *grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=name)


def test_model_loss_and_grads_match_full_logits():
    model = tiny_gpt(seed=7, vocab_size=50304, n_layer=2, n_head=2, n_embd=16, block_size=256, std=0.1).train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50257, (2, 256), generator=g)
    targets = torch.randint(0, 50257, (2, 256), generator=g)
    targets[0, :100] = fd.IGNORE_INDEX  # a prompt without loss
    targets[1, 50:60] = fd.IGNORE_INDEX
    assert (targets != fd.IGNORE_INDEX).sum() > 2 ** 24 // 50304  # more than one chunk
    _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits, _ = model(idx)
    ref = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=fd.IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(), msg=n)
    with torch.no_grad():  # evaluation: reduction='none' gives the loss of each target position, in order
        _, losses = model(idx, targets, reduction="none")
        full = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction="none",
                               ignore_index=fd.IGNORE_INDEX)
    torch.testing.assert_close(losses, full[targets.view(-1) != fd.IGNORE_INDEX], rtol=1e-5, atol=1e-6)


def test_training_step_finds_target_positions_on_the_host():
    """accumulate_gradients finds the positions with a target on the host (target_positions) and hands them to the
    model, so the step's forward and backward hold no op whose output shape depends on the data (a boolean mask, a
    nonzero, an .item()): on a GPU each would make the CPU wait for the device. Same loss and gradients, bitwise, as
    the model given the (B, T) targets."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DataDependentOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            bool_index = name.startswith("index") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat)
            if name in ("nonzero", "masked_select", "_local_scalar_dense", "unique") or bool_index:
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 4096, (2, 64), generator=g), torch.randint(0, 4096, (2, 64), generator=g)
    y[0, :20] = fd.IGNORE_INDEX
    y[1, 40:] = fd.IGNORE_INDEX
    positions, targets = fd.target_positions(y)
    assert positions.tolist() == [i for i in range(128) if y.view(-1)[i] != fd.IGNORE_INDEX]
    assert torch.equal(targets, y.view(-1)[positions])
    grads = []
    for given in ((positions, targets), y):
        model = tiny_gpt(seed=5, vocab_size=4096, std=0.1).train()
        optimizer = model.configure_optimizer(fd.TrainConfig(), "cpu")
        with DataDependentOps() as ops:
            _, loss = model(x, given, reduction="sum")
            loss.backward()
            grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the rest of train()'s step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # the (B, T) form finds the positions itself
        assert ops.seen == ([] if isinstance(given, tuple) else ["nonzero"]), ops.seen
    assert all(torch.equal(a, b) for a, b in zip(*grads))

    calls = []
    model = tiny_gpt(seed=5, vocab_size=4096, std=0.1).train()
    model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[1]))
    fd.accumulate_gradients(model, [(x, y)], len(targets), 1, "cpu")
    assert len(calls) == 1 and torch.equal(calls[0][0], positions) and torch.equal(calls[0][1], targets)


def test_untied_output_layer_gets_its_own_gradient():
    """A user's variant that unties the output layer from the embedding still gets the plain gradients."""
    model = tiny_gpt(seed=6, vocab_size=512, std=0.1).train()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits, _ = model(idx)
    F.cross_entropy(logits.view(-1, 512), targets.view(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_gradients_are_bitwise_reproducible_with_several_threads():
    """A resumed run repeats an uninterrupted one bit for bit, so a step's gradients may not depend on how threads
    interleave their adds (index_put_ with accumulate does, on a CPU with several threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_gpt(seed=2, vocab_size=1024, n_layer=1, n_embd=128, block_size=128).train()
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 20, (8, 128), generator=g)  # few distinct tokens: many adds into the same rows
        targets = torch.randint(0, 1024, (8, 128), generator=g)
        runs = []
        for _ in range(6):
            model.zero_grad(set_to_none=True)
            _, loss = model(idx, targets)
            loss.backward()
            runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for n in run:
            assert torch.equal(run[n], runs[0][n]), n


def test_frozen_tied_weight_leaves_nothing_behind():
    """With the shared weight frozen, no vocab-sized gradient is made or kept for it."""
    model = tiny_gpt(seed=6, vocab_size=512, std=0.1).train()
    model.lm_head.weight.requires_grad_(False)
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    _, loss = model(idx, targets)
    loss.backward()
    assert model.lm_head.weight.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_forward_takes_no_kv_cache():
    """The loss path has no cache (generation calls hidden_states with its own): a cache passed in is refused."""
    model = tiny_gpt(seed=6, vocab_size=512)
    idx = torch.randint(0, 512, (2, 32))
    with pytest.raises(TypeError, match="kv_cache"):
        model(idx, idx, kv_cache=model.new_kv_cache())


def test_tied_weight_gradient_uses_one_vocab_sized_buffer():
    """The token embedding and the output layer share one (vocab, C) weight. Its two gradients are summed in one
    buffer (TiedEmbedding adds its rows into the output layer's), not in two that autograd then adds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class VocabSizedBuffers(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.buffers = shape, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.shape == self.shape:
                    self.buffers.add(t.untyped_storage().data_ptr())
            return out

    model = tiny_gpt(seed=3, vocab_size=4096, n_embd=32).train()
    idx, targets = torch.randint(0, 4096, (2, 64)), torch.randint(0, 4096, (2, 64))
    weight = model.lm_head.weight
    with VocabSizedBuffers(weight.shape) as seen:
        _, loss = model(idx, targets)
        loss.backward()
    seen.buffers.discard(weight.untyped_storage().data_ptr())
    assert seen.buffers == {weight.grad.untyped_storage().data_ptr()}


def test_chunked_loss_writes_every_chunk_into_one_logits_buffer():
    """Three chunks of logits, one (chunk, vocab) allocation, in training and in evaluation: a fresh ~64 MB tensor per
    chunk is fresh memory from the OS on a CPU, and its page faults slow the output layer."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class NewVocabWideTensors(TorchDispatchMode):
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.count = vocab, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            inputs = {t.untyped_storage().data_ptr() for t in tensors}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.size(1) == self.vocab and t.numel() > 0 \
                        and t.untyped_storage().data_ptr() not in inputs:  # new memory, not written in place or out=
                    self.count += 1
            return out

    V, C, N = 50304, 8, 800  # 2**24 // V = 333 rows per chunk: three chunks
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(N, C, generator=g, requires_grad=True), torch.randn(V, C, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    with NewVocabWideTensors(V) as training:
        fd.target_cross_entropy(h, w, t).backward()
    with torch.no_grad(), NewVocabWideTensors(V) as evaluation:
        losses = fd.target_cross_entropy(h, w, t, reduction="none")
    assert (training.count, evaluation.count) == (1, 1)
    expected = F.cross_entropy(h.detach() @ w.detach().t(), t, reduction="none")
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# 6. generation

def test_kv_cache_logits_match_full_forward():
    model = tiny_gpt(seed=8, std=0.3)
    idx = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache()
        step = model.lm_head(fd.GPT.hidden_states(model, idx[:, :10], cache))  # prefill, then one token at a time
        steps = [step[:, -1]]
        for t in range(10, 40):
            step = model.lm_head(fd.GPT.hidden_states(model, idx[:, t:t + 1], cache))
            steps.append(step[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 9:], rtol=1e-4, atol=1e-4)


def test_greedy_with_and_without_cache_agree():
    model = tiny_gpt(seed=9, std=0.3)
    prompt = torch.randint(0, 50257, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    cached = fd.generate(model, prompt, 40, temperature=0, use_cache=True)
    plain = fd.generate(model, prompt, 40, temperature=0, use_cache=False)
    assert len(cached) == 40 and cached == plain
    assert len(set(cached)) > 3  # not one token repeated: the comparison means something
    assert fd.generate(model, prompt, 40, temperature=1.0, top_k=1, use_cache=True) == cached  # top_k=1 is greedy
    ids = torch.tensor([prompt])
    for t in range(5):  # and it is the argmax of the model's own full forward pass
        logits, _ = model(ids)
        assert int(logits[0, -1].argmax()) == cached[t]
        ids = torch.cat([ids, torch.tensor([[cached[t]]])], dim=1)


def test_generation_output_layer_is_the_lm_head():
    """Generation multiplies by a (C, vocab) copy of the output weight on a CPU (a faster layout there)."""
    model = tiny_gpt(seed=4, std=0.3)
    h = torch.randn(3, model.config.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(fd.generation_output_layer(model)(h), model.lm_head(h), rtol=1e-5, atol=1e-5)
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        output_layer = fd.generation_output_layer(model, bf16)
        with bf16:
            logits, expected = output_layer(h), model.lm_head(h)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_generation_stops_at_block_size():
    model = tiny_gpt(seed=9, std=0.3)
    prompt = list(range(100, 110))
    for use_cache in (True, False):
        out = fd.generate(model, prompt, 500, temperature=0, use_cache=use_cache)
        assert len(out) == model.config.block_size - len(prompt)  # prompt and answer fill the context, no more


def constant_output_model(preferred_rows, vocab_size=PADDED_VOCAB):
    """ln_f maps every position to the same vector b, so the logits are wte @ b: rows made parallel to b win."""
    model = tiny_gpt(seed=10, vocab_size=vocab_size, block_size=128)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[preferred_rows] = 1.0  # logit n_embd = 32 against ~0.1 for the random rows
    return model


def test_generation_stops_at_eot():
    model = constant_output_model([EOT])
    with torch.no_grad():
        assert int(model(torch.tensor([[1, 2]]))[0][0, -1].argmax()) == EOT
    for use_cache in (True, False):
        assert fd.generate(model, [1, 2, 3], 30, temperature=0, use_cache=use_cache) == []
        g = torch.Generator().manual_seed(0)
        assert fd.generate(model, [1, 2, 3], 30, temperature=1.0, generator=g, use_cache=use_cache) == []


def test_generation_returns_tokens_before_eot_and_stops(monkeypatch):
    script = [5, 6, 7, EOT, 9, 10]

    class ScriptedHead:  # the output layer says 5, 6, 7, EOT, ... whatever the input
        calls = 0

        def __call__(self, h):
            logits = torch.zeros(1, PADDED_VOCAB)
            logits[0, script[self.calls]] = 100.0
            self.calls += 1
            return logits

    for use_cache in (True, False):
        model = fd.GPT(fd.GPTConfig(block_size=64, vocab_size=PADDED_VOCAB, n_layer=1, n_head=1, n_embd=8))
        head = ScriptedHead()
        monkeypatch.setattr(fd, "generation_output_layer", lambda model, autocast=None: head)
        g = torch.Generator().manual_seed(0)
        assert fd.generate(model, [1, 2], 30, temperature=0.8, generator=g, use_cache=use_cache) == [5, 6, 7]
        assert head.calls == 4  # nothing after the EOT


def test_never_samples_padding_ids():
    model = constant_output_model(list(range(50257, PADDED_VOCAB)))
    with torch.no_grad():
        assert int(model(torch.tensor([[1, 2]]))[0][0, -1].argmax()) >= 50257  # the padding rows would win
    g = torch.Generator().manual_seed(0)
    sampled = fd.generate(model, [1], 120, temperature=1.0, generator=g)
    sampled += fd.generate(model, [1], 120, temperature=2.0, top_k=50, generator=g)
    greedy = fd.generate(model, [1], 20, temperature=0)
    assert len(sampled) > 200 and greedy  # EOT is 1 of 50257 near-equal choices: it rarely ends a sample early
    assert max(sampled + greedy) < 50257


def test_batched_generation_equals_one_prompt_at_a_time():
    """generate_batch (the samples during training) left-pads prompts of different lengths into one batch: each row
    must get exactly the tokens generate() gives that prompt alone, greedy and seeded sampling, including rows that
    reach the block size at different times and a prompt too long to answer."""
    model = tiny_gpt(seed=12, std=0.3)
    g = torch.Generator().manual_seed(5)
    block = model.config.block_size
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (1, 7, 23, 40, block - 3, block, block + 1)]
    for temperature, top_k in ((0, 0), (0.9, 100), (1.0, 0)):
        gens = lambda: [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
        alone = [fd.generate(model, p, 30, temperature, top_k, gen) for p, gen in zip(prompts, gens())]
        assert fd.generate_batch(model, prompts, 30, temperature, top_k, gens()) == alone
        assert [len(a) for a in alone] == [30, 30, 30, 24, 3, 0, 0]  # the rows stop at different steps
        assert len(set(alone[0])) > 3  # not one token repeated: the comparison means something
    assert fd.generate_batch(model, [], 30) == [] and fd.generate_batch(model, [prompts[-1]], 30) == [[]]
    assert not model.training


def test_batched_generation_stops_each_row_at_its_eot(monkeypatch):
    """Each row ends at its own <|endoftext|>, and a finished row leaves the batch: the others go on without it."""
    follows = {2: 20, 20: EOT, 3: 30, 30: 31, 31: 32, 32: EOT, 6: 60, 60: 61, 61: 62, 62: 63}
    batch_sizes = []

    def last_token_as_hidden(model, idx, cache, *args):  # (B, T) ids -> (B, T, 1): the head sees each row's last
        for layer in cache:  # token; a cache with one entry per row, as the real one has
            layer[0] = layer[1] = torch.zeros(idx.size(0), 1, 1, 1)
        return idx[..., None].float()

    def scripted_head(h):  # the next token after each row's last one, from `follows`
        batch_sizes.append(h.size(0))
        logits = torch.zeros(h.size(0), PADDED_VOCAB)
        logits[torch.arange(h.size(0)), [follows[int(t)] for t in h[:, 0]]] = 100.0
        return logits

    model = fd.GPT(fd.GPTConfig(block_size=64, vocab_size=PADDED_VOCAB, n_layer=1, n_head=1, n_embd=8))
    monkeypatch.setattr(fd.GPT, "hidden_states", last_token_as_hidden)
    monkeypatch.setattr(fd, "generation_output_layer", lambda model, autocast=None: scripted_head)
    prompts = [[1, 2], [3], [4, 5, 6]]
    assert fd.generate_batch(model, prompts, 4, temperature=0) == [[20], [30, 31, 32], [60, 61, 62, 63]]
    assert batch_sizes == [3, 3, 2, 2]  # the first row left after its EOT
    follows[61], batch_sizes[:] = EOT, []
    assert fd.generate_batch(model, prompts, 30, temperature=0) == [[20], [30, 31, 32], [60, 61]]
    assert batch_sizes == [3, 3, 2, 1]  # and nothing after the last row's EOT


def test_top_k_keeps_ties_with_the_kth_logit():
    """Top-k draws among the k best and any tied with the k-th, as masking all other logits to -inf does:
    logits [3, 1, 1, 1, 0, ...] with k=2 give token 0 e^3 / (e^3 + 3e) and each 1-logit token e / (e^3 + 3e)."""
    logits = torch.zeros(PADDED_VOCAB)
    logits[:4] = torch.tensor([3.0, 1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    draws = Counter(fd.sample_next(logits, 1.0, 2, g) for _ in range(4000))
    assert set(draws) == {0, 1, 2, 3}
    expected = math.e ** 3 / (math.e ** 3 + 3 * math.e)  # 0.711; keeping exactly two tokens would give 0.881
    assert abs(draws[0] / 4000 - expected) < 0.03, draws


def test_seeded_sampling_is_deterministic():
    model = tiny_gpt(seed=11, std=0.3)
    prompt = [464, 2068, 7586, 21831]

    def sample(seed, global_seed):
        torch.manual_seed(global_seed)  # the global RNG plays no part
        return fd.generate(model, prompt, 30, temperature=0.9, top_k=100, generator=torch.Generator().manual_seed(seed))

    first = sample(123, 0)
    assert len(first) == 30
    assert sample(123, 1) == first
    assert sample(124, 0) != first
