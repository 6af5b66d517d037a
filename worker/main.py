"""The built-in trainer: a GPT on real text or token files, written on the public SDK.

``geotrain launch`` runs this as every worker's entrypoint unless the topology names a script.
It is an ordinary SDK user: it builds the model (``model``, a preset or a shape), the inner optimizer
(``training.inner_optimizer``: AdamW, SGD or Muon, its learning-rate schedule and gradient clipping,
the one recipe ddp and every DiLoCo variant share) and the data sampler (the site's own ``sites[].data``,
else ``data``), wraps them in :class:`geotrain.DiLoCo`, and loops. On a CUDA site the forward pass and
the loss run under bf16 autocast (``model.bf16``); weights and optimizer state stay float32. The first site's leader evaluates the global model
on held-out text before training and after every round; an eval loss that is NaN or infinite
(the global model diverged) is recorded and stops it with an error (exit 1), and the launcher then
fails the run (geotrain.run.summary.nonfinite_model) rather than restarting the site.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time

import torch

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.sdk import DiLoCo, SiteContext, init
from geotrain.config.topology import Topology, model_vocab
from geotrain.schedule import lr_at, schedule_args, set_lr
from geotrain.worker.data import BatchSampler, DataSpec, eval_batches, evaluate, load_corpus
from geotrain.worker.model import GPTConfig, build_model, flops_per_token
from geotrain.worker.slowdown import Slowdown


def worker_seed(seed: int, site: str, rank: int) -> int:
    """A data-order seed distinct for every worker, stable across runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{site}/{rank}".encode()).digest()[:4], "little")


def require_finite_eval(loss: float, rnd: int, step: int) -> None:
    """Raise when an eval loss is NaN or infinite: the global model diverged, and training on would
    only spend time (the launcher fails the run from the recorded eval)."""
    if not math.isfinite(loss):
        raise GeotrainError(f"the eval loss at round {rnd} (inner step {step}) is {loss}: the global model "
                            "diverged; stopping instead of training on (learning rates too high?)")


def build_inner_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "muon":  # MuLoCo (arXiv 2505.23725): Muon on the hidden matrices, AdamW on the rest
        from geotrain.worker.optim import MuonAdamW

        return MuonAdamW(model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def gpt_config(topo: Topology) -> GPTConfig:
    """The built-in model's shape: the topology's `model` (a preset, with what is written beside it)."""
    m = topo.model
    return GPTConfig(vocab_size=model_vocab(topo), block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                     n_embd=m.n_embd)


def train(ctx: SiteContext, topo: Topology) -> None:
    torch.set_num_threads(1)
    tr = topo.training
    site_cfg = topo.site(ctx.site)
    device = torch.device("cuda", torch.cuda.current_device()) if site_cfg.device == "cuda" else torch.device("cpu")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and topo.model.bf16
                else contextlib.nullcontext())
    events = EventLog(ctx.run_dir / "metrics.jsonl" if ctx.run_dir else None, ctx.proc)

    data, field = (site_cfg.data, f"sites[{topo.site_names.index(ctx.site)}].data") if site_cfg.data is not None \
        else (topo.data, "data")
    m = topo.model
    corpus = load_corpus(DataSpec.of(data), m.block_size, field=field)
    if ctx.is_leader:  # which corpus this site trains on (per-site data: each campus its own)
        events.emit("data", site=ctx.site, field=field, source=data.source, description=corpus.description,
                    fingerprint=corpus.fingerprint(), train_tokens=int(corpus.train.size),
                    eval_tokens=int(corpus.eval.size))
    cfg = gpt_config(topo)
    model = build_model(cfg, seed=topo.seed).to(device)
    forward = torch.compile(model) if m.compile else model  # the module stays the one trained, merged and saved
    opt = build_inner_optimizer(model, tr.inner_optimizer)
    sampler = BatchSampler(corpus.train, tr.batch_size, m.block_size, seed=worker_seed(topo.seed, ctx.site, ctx.rank))
    evaluator = ctx.is_leader and ctx.site == topo.sites[0].name
    held_out = eval_batches(corpus.eval, tr.batch_size, m.block_size, tr.eval_batches) if evaluator else []
    if evaluator:
        n = model.num_params()
        events.emit("model", params=n, flops_per_token=flops_per_token(cfg, n), vocab_size=cfg.vocab_size,
                    n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, block_size=cfg.block_size,
                    preset=m.preset, device=device.type, bf16=device.type == "cuda" and m.bf16, compile=m.compile)

    def run_eval(rnd: int, step: int, **extra) -> None:
        t0 = time.perf_counter()
        with autocast:
            loss = evaluate(model, held_out, device=device)
        events.emit("eval", round=rnd, step=step, loss=loss, seconds=round(time.perf_counter() - t0, 6), **extra)
        require_finite_eval(loss, rnd, step)  # recorded first: the launcher reads why this worker stopped

    inner_steps = tr.inner_steps
    if tr.algorithm == "async-diloco" and tr.asynchronous.dynamic_local_steps:
        inner_steps = max(1, round(tr.inner_steps / site_cfg.slowdown))  # slower sites do fewer steps per merge
    inner = tr.inner_optimizer
    schedule = schedule_args(inner.schedule, tr.rounds * inner_steps)  # a pure function of the step: resumes exactly
    scheduled = inner.schedule.kind != "constant" or inner.schedule.warmup_steps > 0
    with DiLoCo(model, opt, inner_steps=inner_steps, algorithm=tr.algorithm, context=ctx, events=events,
                stateful={"sampler": sampler}, tokens_per_step=tr.batch_size * topo.model.block_size,
                clip_grad_norm=inner.clip_grad_norm) as diloco:
        if evaluator and diloco.round == 0:
            run_eval(0, 0)
        elif evaluator:
            # A resumed run or a restarted site joins at a committed round. Its eval may never have
            # been written (the run was killed between the commit and the eval): evaluate the model
            # it joined with, so that every committed round has an eval (the same one, bit for bit,
            # as the uninterrupted run's for synchronous DiLoCo). A site back after the last round (the
            # others finished without it) evaluates the final model: the run's final loss is of that.
            run_eval(diloco.round, diloco.local_step, rejoin=True)
        last_eval_round = diloco.round
        slow = Slowdown(site_cfg.slowdown, ctx.rank)
        while diloco.round < tr.rounds:
            slow.start()
            if scheduled:
                set_lr(opt, lr_at(diloco.local_step, base_lr=inner.lr, **schedule))
            x, y = sampler.next_batch()
            with autocast:
                _, loss = forward(x.to(device), y.to(device))
            loss.backward()
            slow.before_sync()  # a slower site: rank 0 sleeps here, the site waits for it (worker/slowdown.py)
            opt.step()
            opt.zero_grad(set_to_none=True)
            slow.end(wan_s=diloco.last_step_wan_s)
            diloco.step(loss=loss.item())
            if evaluator and diloco.round > last_eval_round:
                last_eval_round = diloco.round
                if diloco.overlapped:
                    with diloco.global_parameters():
                        run_eval(diloco.round, diloco.local_step)
                else:
                    run_eval(diloco.round, diloco.local_step)
        if ctx.is_leader:
            events.emit("site_done", site=ctx.site, steps=diloco.local_step, rounds=diloco.round,
                        compute_s=round(diloco.compute_s, 6), wan_wait_s=round(diloco.wan_wait_s, 6),
                        checkpoint_stall_s=round(diloco.checkpoint_stall_s, 6))
        if tr.algorithm == "async-diloco" and ctx.site == topo.sites[0].name:
            # Asynchronous sites finish at different times: the evaluating site's last eval above saw
            # the global model before the others' last updates. Evaluate the model once every site
            # has made its merges (sites x rounds commits), so that the run's final loss is comparable.
            version = diloco.fetch_global(len(topo.sites) * tr.rounds)
            if evaluator and version is not None:
                with diloco.global_parameters():
                    run_eval(diloco.round, diloco.local_step, version=version, final=True)


def main() -> int:
    try:
        ctx = init()
        if not ctx.topology_path:
            raise GeotrainError("the built-in trainer needs GEOTRAIN_TOPOLOGY (set by `geotrain launch`)")
        with open(ctx.topology_path) as f:
            topo = Topology.model_validate(json.load(f))
        train(ctx, topo)
    except GeotrainError as exc:
        print(f"geotrain worker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
