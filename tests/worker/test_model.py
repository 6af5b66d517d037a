"""geotrain.worker.model: deterministic init, shapes, initial loss, a short training smoke."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from geotrain.worker.data import BatchSampler, DataSpec, TextCorpus, eval_batches, evaluate
from geotrain.worker.model import GPT, GPTConfig, build_model

TINY = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_weights_in_another_process():
    code = (
        "import hashlib, torch\n"
        "torch.manual_seed(12345)\n"  # the caller's global RNG state must not matter
        "from geotrain.worker.model import GPTConfig, build_model\n"
        "m = build_model(GPTConfig(), seed=7)\n"
        "h = hashlib.sha256()\n"
        "for name, t in sorted(m.state_dict().items()):\n"
        "    h.update(name.encode()); h.update(t.detach().cpu().contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == state_hash(build_model(GPTConfig(), seed=7))


def test_seed_matters_and_global_rng_untouched():
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a = build_model(TINY, seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # build_model used a forked RNG
    assert state_hash(a) == state_hash(build_model(TINY, seed=1))
    assert state_hash(a) != state_hash(build_model(TINY, seed=2))


def test_forward_shapes_and_tied_head():
    model = build_model(TINY, seed=0)
    idx = torch.randint(0, 256, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, 256)
    assert loss is None
    logits, loss = model(idx, idx)
    assert loss is not None and loss.dim() == 0
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_num_params_default_config():
    model = build_model(GPTConfig(), seed=0)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values()) == 120_576


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError):
        GPTConfig(n_layer=0)


def test_initial_loss_is_about_uniform():
    model = build_model(GPTConfig(), seed=3)
    idx = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, tgt)
    assert abs(loss.item() - math.log(256)) < 0.5


def test_loss_goes_down_when_training_on_stdlib_text():
    cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=48)
    corpus = TextCorpus.load(DataSpec(max_bytes=200_000), block_size=cfg.block_size)
    model = build_model(cfg, seed=0)
    sampler = BatchSampler(corpus.train, batch_size=16, block_size=cfg.block_size, seed=0)
    held_out = eval_batches(corpus.eval, batch_size=16, block_size=cfg.block_size, n_batches=4)
    before = evaluate(model, held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(30):
        x, y = sampler.next_batch()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = evaluate(model, held_out)
    assert before > 5.0
    assert after < before - 1.0, (before, after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = build_model(TINY, seed=0)
    idx = torch.randint(0, 256, (2, TINY.block_size))
    _, loss_cpu = model(idx, idx)
    model = model.to("cuda")
    _, loss_gpu = model(idx.to("cuda"), idx.to("cuda"))
    loss_gpu.backward()
    assert abs(loss_cpu.item() - loss_gpu.item()) < 1e-3
