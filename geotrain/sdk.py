"""The SDK: wrap your own PyTorch training loop in DiLoCo across sites.

    import geotrain

    ctx = geotrain.init()                      # site, rank, coordinator: from the environment
    model = MyModel().to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with geotrain.DiLoCo(model, opt, context=ctx) as diloco:   # H and algorithm from the topology
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()                           # gradients were averaged inside the site first
            opt.zero_grad()
            diloco.step(loss=loss.item())        # every H steps: merge across the WAN

What happens (DiLoCo, arXiv 2311.08105):
- inside a site the workers train data-parallel: an optimizer pre-step hook all-reduces the
  gradients over the site's process group (gloo on CPU, NCCL on CUDA). Inner steps never cross
  the WAN;
- every H inner steps the site leader (rank 0) sends the pseudo-gradient θ_global − θ_site to the
  coordinator, which averages all sites' pseudo-gradients, applies the outer optimizer (SGD with
  Nesterov momentum) and returns the new global parameters; the leader broadcasts them to its site;
- the variants merge differently, each its own class in geotrain.worker.algorithms:
  ``streaming-diloco`` merges one of P fragments at a time, overlapped with inner steps (Streaming
  DiLoCo, arXiv 2501.18512); ``async-diloco`` lets every site merge on its own schedule, optionally
  overlapped (after Asynchronous Local-SGD, arXiv 2401.09135); ``ddp`` (the baseline) also averages
  the gradients of all sites across the WAN at every step, so no outer step happens;
- how an update travels (geotrain.worker.exchange): through the coordinator (the star) or, with
  ``training.merge: ring|hierarchical``, among the site leaders, falling back to the star.

One step, as :meth:`DiLoCo.step` reads: count the inner step, ``if algo.due(): algo.sync()``,
then the worker's checkpoint.

Environment: set by ``geotrain launch``, torchrun-style, and read once, in geotrain.worker.context;
:data:`ENV_VARS` names every variable and what it means.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.wire.transport import flatten, unflatten_into
from geotrain.worker.algorithms import Site, algorithm_class
from geotrain.orchestrator.fingerprint import encode_spec, model_spec
from geotrain.worker.crash import note_position
from geotrain.worker.metrics import check_scalars, eval_fields
from geotrain.worker.context import ENV_VARS, SiteContext, init  # noqa: F401 - the SDK's public names
from geotrain.worker.exchange import open_exchange
from geotrain.worker.site_group import SiteGroup

log = logging.getLogger(__name__)


def _lr_of(optimizer: torch.optim.Optimizer) -> float | None:
    """The first parameter group's learning rate (a plain float even where an optimizer keeps a tensor)."""
    lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) and not isinstance(lr, bool) else None


class DiLoCo:
    """DiLoCo (or one of its variants, or the DDP baseline) around a model and its inner optimizer.

    The algorithm is a class of geotrain.worker.algorithms, chosen by name (``algorithm``, else the
    topology's): synchronous DiLoCo (arXiv 2311.08105), Streaming DiLoCo (arXiv 2501.18512),
    asynchronous DiLoCo after Async Local-SGD (arXiv 2401.09135), or ``ddp``. This facade keeps the
    inner-step bookkeeping and the worker's checkpoints; the algorithm decides when and how to merge.

    ``tokens_per_step``: tokens one worker trains on per inner step, if the model has tokens; progress and
    summary.json report tokens and tokens/s only when it is given.

    ``stateful`` names extra objects with ``state_dict()``/``load_state_dict()`` (a data sampler, say)
    that go into this worker's checkpoints with the inner optimizer, so a resumed run continues exactly.

    ``clip_grad_norm``: clip the gradient to this global L2 norm before every inner step, *after* it has
    been averaged over the site's workers (the papers clip at 1.0). Clipping in your own loop before
    ``optimizer.step()`` would clip each worker's own gradient instead; :attr:`last_grad_norm` is the
    norm before clipping.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, inner_steps: int | None = None,
                 algorithm: str | None = None, context: SiteContext | None = None, events: EventLog | None = None,
                 stateful: dict | None = None, tokens_per_step: int | None = None,
                 clip_grad_norm: float | None = None):
        self.ctx = context or init()
        inner_steps = self.ctx.inner_steps if inner_steps is None else inner_steps
        algorithm = self.ctx.algorithm if algorithm is None else algorithm
        cls = algorithm_class(algorithm)
        if inner_steps < 1:
            raise GeotrainError(f"DiLoCo(inner_steps={inner_steps}): must be at least 1")
        self.model = model
        self.optimizer = optimizer
        self.H = inner_steps
        self.algorithm = algorithm
        self.stateful = dict(stateful or {})
        if tokens_per_step is not None and (isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, int)
                                            or tokens_per_step < 1):
            raise GeotrainError(f"DiLoCo(tokens_per_step={tokens_per_step!r}): expected a positive int")
        self.tokens_per_step = tokens_per_step
        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                           or not 0 < clip_grad_norm < float("inf")):
            raise GeotrainError(f"DiLoCo(clip_grad_norm={clip_grad_norm!r}): expected a positive finite number")
        self.clip_grad_norm = clip_grad_norm
        self.last_grad_norm: float | None = None
        self.events = events or EventLog(self.ctx.run_dir / "metrics.jsonl" if self.ctx.run_dir else None, self.ctx.proc)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.compute_s = 0.0
        self.checkpoint_stall_s = 0.0
        self._writer = None
        if self.ctx.checkpoint_every and self.ctx.checkpoint_dir:
            from geotrain.storage.checkpoint import BackgroundWriter

            self._writer = BackgroundWriter(self.ctx.checkpoint_dir, self.ctx.part, self.ctx.topology_sha256,
                                            keep=self.ctx.checkpoint_keep,
                                            on_error=lambda r, exc: self.events.emit(
                                                "checkpoint_failed", round=r, part=self.ctx.part, reason=str(exc)))
        t0 = time.perf_counter()
        self._group = SiteGroup(self.ctx.workers, self.ctx.rank, self.ctx.device)
        self._star, self._exchange = open_exchange(self.ctx, self.events, rings=cls.uses_rings) \
            if self.ctx.is_leader else (None, None)
        if self._star is not None:  # the coordinator refuses a site whose model is not the run's
            self._star.model_spec = encode_spec(model_spec(model))
        self.algo = cls(Site(self.ctx, self._group, self.params, self.H, self.events, self._star, self._exchange))
        t1 = time.perf_counter()
        self.algo.join()
        t2 = time.perf_counter()
        self._restore_own_state()
        t3 = time.perf_counter()
        if self.ctx.is_leader:  # where a (re)starting site's time goes (docs/events.md)
            self.events.emit("site_setup", site=self.ctx.site, connect_s=round(t1 - t0, 6), join_s=round(t2 - t1, 6),
                             restore_s=round(t3 - t2, 6), seconds=round(t3 - t0, 6))
        if self._exchange is not None:
            self._exchange.begin(self.algo.round)
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        self._last = time.perf_counter()

    # ---- public ----
    def step(self, loss: float | None = None) -> bool:
        """Call after each inner ``optimizer.step()``. Returns True when this step ended with a merge."""
        algo = self.algo
        compute = time.perf_counter() - self._last - algo.step_wan_s
        self.compute_s += compute
        algo.local_step += 1
        note_position(algo.round, algo.local_step)
        if self.ctx.is_leader:
            self.events.emit("inner_step", site=self.ctx.site, step=algo.local_step, round=algo.round,
                             loss=loss, compute_s=round(compute, 6), wan_s=round(algo.step_wan_s, 6),
                             lr=_lr_of(self.optimizer),
                             **({"tokens": self.tokens_per_step} if self.tokens_per_step else {}),
                             **({"grad_norm": round(self.last_grad_norm, 6)} if self.last_grad_norm is not None else {}))
        merged = False
        if algo.due():
            merged = algo.sync()
            if algo.checkpoints:
                self._maybe_checkpoint()
        algo.step_wan_s = 0.0
        self._last = time.perf_counter()
        return merged

    def log(self, step: int | None = None, **scalars) -> None:
        """Record scalars of your own (``diloco.log(accuracy=acc, lr=lr)``): a ``metric`` event at ``step``
        (default: this site's inner step) that progress, summary.json, TensorBoard, Prometheus and
        ``geotrain report`` show, one line per site (geotrain.worker.metrics)."""
        values = check_scalars("diloco.log", scalars)
        self.events.emit("metric", site=self.ctx.site, rank=self.ctx.rank, round=self.algo.round,
                         step=self.local_step if step is None else int(step), **values)

    def log_eval(self, value, metric: str = "loss", step: int | None = None, **scalars) -> None:
        """Record an evaluation of the model (``diloco.log_eval(mse, metric="mse")``), from the site leader
        (other ranks' calls are ignored: every rank of a site holds the same model after a merge). A NaN
        or infinite value fails the run: the model is damaged."""
        fields = eval_fields(metric, value, scalars)
        if self.ctx.is_leader:
            self.events.emit("eval", site=self.ctx.site, round=self.algo.round,
                             step=self.local_step if step is None else int(step), **fields)

    @property
    def overlapped(self) -> bool:
        """True when merges run in the background of inner steps (streaming, or async with overlap):
        the model then holds local parameters that differ from the global ones even right after a merge
        (evaluate inside :meth:`global_parameters`)."""
        return self.algo.overlapped

    @property
    def round(self) -> int:
        """Rounds this site has completed (streaming: its lowest fragment round; async: its own merges)."""
        return self.algo.round

    @property
    def local_step(self) -> int:
        return self.algo.local_step

    @property
    def version(self) -> int:
        """The global version this site last took from the coordinator."""
        return self.algo.version

    @property
    def global_flat(self) -> torch.Tensor:
        """This site's copy of the global parameters, flat."""
        return self.algo.global_flat

    @property
    def wan_wait_s(self) -> float:
        """Seconds spent waiting on the WAN so far."""
        return self.algo.wan_wait_s

    @property
    def last_step_wan_s(self) -> float:
        """Seconds the last optimizer step waited on the WAN (ddp's gradient exchange)."""
        return self.algo.last_step_wan_s

    def close(self) -> None:
        self.algo.close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._exchange is not None:
            self._exchange.close()
            self._exchange = None

    def __enter__(self) -> "DiLoCo":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None:
            self._group.barrier()  # every rank is done with the site's process group before any rank tears it down

    def fetch_global(self, min_version: int) -> int | None:
        """Wait until the coordinator holds global version >= ``min_version`` and take it as this site's
        global parameters (see :meth:`global_parameters`); the model's own parameters are left alone.
        Every rank of the site calls it. Returns the version, or None when the coordinator could not
        provide it (an event says why). For an evaluation of the final model of an asynchronous run,
        whose sites finish at different times."""
        def fetch():
            try:
                p = self._star.fetch(min_version)
            except GeotrainError as exc:
                self.events.emit("fetch_failed", site=self.ctx.site, min_version=min_version, reason=str(exc))
                return [-1], None
            return [p.version], p.tensor()

        (version,), flat = self._group.leader_then_broadcast(fetch, ints=1, numel=self.global_flat.numel())
        if flat is None:
            return None
        self.algo.global_flat = flat.clone()
        return version

    @contextmanager
    def global_parameters(self):
        """Context manager: the model holds the global parameters inside (for evaluation), its own after."""
        local = flatten(self.params)
        unflatten_into(self.global_flat, self.params)
        try:
            yield self.model
        finally:
            unflatten_into(local, self.params)

    # ---- inside the site ----
    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Average gradients inside the site (and whatever the algorithm adds: ddp, across sites)
        before the inner step."""
        self.algo.last_step_wan_s = 0.0
        if self.ctx.workers > 1 or self.algo.wan_gradients:
            self._average_gradients()
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            self.last_grad_norm = float(norm)

    def _average_gradients(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self._group.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        flat = self.algo.average_gradients(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    # ---- this worker's own checkpoint part ----
    def _restore_own_state(self) -> None:
        """Three ways in: a fresh start (round 0), a resume from checkpoint round r (GEOTRAIN_RESUME_ROUND:
        this worker's own part is loaded, exactly), or a rejoin after a failure (the coordinator said
        from which version; this worker's newest checkpoint part, if any, restores optimizer and data)."""
        if not self.ctx.checkpoint_dir:
            return
        from geotrain.storage.checkpoint import list_rounds, load_part

        wanted = self.ctx.resume_round
        candidates = [r for r in reversed(list_rounds(self.ctx.checkpoint_dir, [self.ctx.part]))
                      if r.complete and (r.round == wanted if wanted is not None else r.round <= self.round)]
        if not candidates:
            if wanted is not None:
                raise GeotrainError(f"{self.ctx.proc}: no verified checkpoint part {self.ctx.part} for round {wanted} "
                                    f"under {self.ctx.checkpoint_dir}")
            return
        from geotrain.worker.state import optimizer_from_parts, set_rng_state

        tensors, state = load_part(self.ctx.checkpoint_dir, candidates[0].round, self.ctx.part)
        optimizer_from_parts(self.optimizer, tensors.get("inner", {}), state["optimizer"])
        for name, obj in self.stateful.items():
            if name in state.get("stateful", {}):
                obj.load_state_dict(state["stateful"][name])
        set_rng_state(state.get("rng", {}))
        self.events.emit("worker_state_restored", site=self.ctx.site, rank=self.ctx.rank, round=candidates[0].round,
                         joined_at=self.round)

    def _maybe_checkpoint(self) -> None:
        every = self.ctx.checkpoint_every
        if self._writer is None or not every or self.round % every:
            return
        from geotrain.worker.state import optimizer_to_parts, rng_state

        tensors, meta = optimizer_to_parts(self.optimizer)
        state = {"round": self.round, "step": self.local_step, "optimizer": meta, "rng": rng_state(),
                 "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()}}
        self.checkpoint_stall_s += self._writer.submit(self.round, {"inner": tensors}, state)
