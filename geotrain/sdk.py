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
- with ``algorithm="ddp"`` (the baseline) the hook also averages the gradients of all sites across
  the WAN at every step, so the sites stay identical and no outer step happens.

Environment (set by ``geotrain launch``, torchrun-style; each variable is read here only):
GEOTRAIN_RUN, GEOTRAIN_RUN_DIR, GEOTRAIN_SITE, GEOTRAIN_SITE_RANK, GEOTRAIN_SITE_WORKERS,
GEOTRAIN_COORDINATOR (host:port, through the site's WAN link), GEOTRAIN_ETCD, GEOTRAIN_TOPOLOGY,
GEOTRAIN_DEVICE, MASTER_ADDR and MASTER_PORT (the site's own process group).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from geotrain.errors import CoordinatorUnavailable, GeotrainError, QuorumLost, StaleRound, TransferCorrupt
from geotrain.events import EventLog
from geotrain.worker.context import ENV_VARS, SiteContext, init  # noqa: F401 - the SDK's public names
from geotrain.wire.transport import fingerprint, flatten, unflatten_into

log = logging.getLogger(__name__)

ALGORITHMS = ("diloco", "ddp", "async-diloco", "streaming-diloco")
REBUILD_TIMEOUT_S = 20.0  # rebuilding the rings mid-run: how long a leader waits for its ring neighbours


class DiLoCo:
    """DiLoCo (or the DDP baseline) around a model and its inner optimizer. See the module docstring.

    ``stateful`` names extra objects with ``state_dict()``/``load_state_dict()`` (a data sampler, say)
    that go into this worker's checkpoints with the inner optimizer, so a resumed run continues exactly.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, inner_steps: int | None = None,
                 algorithm: str | None = None, context: SiteContext | None = None, events: EventLog | None = None,
                 stateful: dict | None = None):
        self.ctx = context or init()
        inner_steps = self.ctx.inner_steps if inner_steps is None else inner_steps
        algorithm = self.ctx.algorithm if algorithm is None else algorithm
        if algorithm not in ALGORITHMS:
            raise GeotrainError(f"DiLoCo(algorithm={algorithm!r}): expected one of {', '.join(ALGORITHMS)}")
        if inner_steps < 1:
            raise GeotrainError(f"DiLoCo(inner_steps={inner_steps}): must be at least 1")
        self.model = model
        self.optimizer = optimizer
        self.H = inner_steps
        self.algorithm = algorithm
        self.stateful = dict(stateful or {})
        self.codec, self.block, self.error_feedback = self.ctx.codec, self.ctx.block, self.ctx.error_feedback
        self._ef: dict[int, object] = {}
        self.version = 0
        self.P = self.ctx.fragments if algorithm == "streaming-diloco" else 1
        self.tau, self.alpha = self.ctx.overlap_steps, self.ctx.alpha
        self._slices: list[slice] = []
        self._inflight: dict[int, tuple] = {}
        self._exchange_bytes: dict[int, tuple[int, int]] = {}  # fragment -> (sent, received) of its last exchange
        self._pool = None
        self.events = events or EventLog(self.ctx.run_dir / "metrics.jsonl" if self.ctx.run_dir else None, self.ctx.proc)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.client = None
        self.round = 0
        self.local_step = 0
        self.wan_wait_s = 0.0
        self.compute_s = 0.0
        self.checkpoint_stall_s = 0.0
        self.last_step_wan_s = 0.0  # seconds the last optimizer step waited on the WAN (ddp's gradient exchange)
        self._step_wan_s = 0.0
        self._writer = None
        if self.ctx.checkpoint_every and self.ctx.checkpoint_dir:
            from geotrain.storage.checkpoint import BackgroundWriter

            self._writer = BackgroundWriter(self.ctx.checkpoint_dir, self.ctx.part, self.ctx.topology_sha256,
                                            keep=self.ctx.checkpoint_keep,
                                            on_error=lambda r, exc: self.events.emit(
                                                "checkpoint_failed", round=r, part=self.ctx.part, reason=str(exc)))
        if self.ctx.is_leader:
            from geotrain.worker.client import CoordinatorClient

            self.client = CoordinatorClient(self.ctx.coordinator, self.ctx.site, timeout_s=self.ctx.rpc_timeout_s,
                                            retry_deadline_s=self.ctx.retry_deadline_s)
        self._ring_next = 0  # the round at which the coordinator told us to rebuild the rings (0: none)
        self._join()
        if algorithm == "streaming-diloco":
            from concurrent.futures import ThreadPoolExecutor

            from geotrain.wire.fragments import fragment_slices

            self._slices = fragment_slices(self.global_flat.numel(), self.P)
            self._offsets = [((f + 1) * self.H // self.P) % self.H for f in range(self.P)]
            self._rejoined: dict[int, int] = {}  # fragment -> the round a rejoin told us to send next
            self._stream_realign()
            self._pool = ThreadPoolExecutor(max_workers=self.P, thread_name_prefix="stream") if self.ctx.is_leader else None
        self._pending = None  # async-diloco with overlap: the merge in flight
        if algorithm == "async-diloco" and self.tau > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.tau = min(self.tau, self.H - 1)  # dynamic local steps can make a site's H small
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async") if self.ctx.is_leader else None
        self._rings: dict = {}
        if self.ctx.rings and self.ctx.is_leader and algorithm == "diloco" and self.round == 0 \
                and self.ctx.resume_round is None and all(m.get("at_start", True) for m in self.ctx.rings):
            self._connect_rings()
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        self._last = time.perf_counter()

    # ---- public ----
    def step(self, loss: float | None = None) -> bool:
        """Call after each inner ``optimizer.step()``. Returns True when this step ended with a merge."""
        now = time.perf_counter()
        compute = now - self._last - self._step_wan_s
        self.compute_s += compute
        self.local_step += 1
        merged = False
        if self.ctx.is_leader:
            self.events.emit("inner_step", site=self.ctx.site, step=self.local_step, round=self.round,
                             loss=loss, compute_s=round(compute, 6), wan_s=round(self._step_wan_s, 6))
        if self.algorithm == "streaming-diloco":
            merged = self._stream_step()
        elif self._pending is not None:
            if self.local_step >= self._pending[1]:
                self._async_finish()
                merged = True
        elif self.local_step % self.H == 0:
            if self.overlapped and self.round < self.ctx.rounds - 1:  # the run's last merge is waited for
                self._async_send()
            elif self.algorithm in ("diloco", "async-diloco"):
                self._merge()
                merged = True
            else:
                self.round += 1
            if self.algorithm == "diloco" or self.algorithm == "ddp":
                self._maybe_checkpoint()
        self._step_wan_s = 0.0
        self._last = time.perf_counter()
        return merged

    @property
    def overlapped(self) -> bool:
        """True when merges run in the background of inner steps (streaming, or async with overlap):
        the model then holds local parameters that differ from the global ones even right after a merge
        (evaluate inside :meth:`global_parameters`)."""
        return self.algorithm == "streaming-diloco" or (self.algorithm == "async-diloco" and self.tau > 0)

    def close(self) -> None:
        for frag, (future, _due, t0) in list(self._inflight.items()):  # streaming: finish what is in flight
            self._finish_fragment(frag, future, t0)
        if self._pending is not None:
            self._async_finish()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for peer in self._rings.values():
            peer.close()
        self._rings = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> "DiLoCo":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None and self.ctx.workers > 1 and dist.is_initialized():
            dist.barrier()  # every rank is done with the site's process group before any rank tears it down

    # ---- the protocol ----
    def _join(self) -> None:
        """Start from the global model: the leader fetches it (providing it if there is none yet).

        Three ways in: a fresh start (round 0), a resume from checkpoint round r (GEOTRAIN_RESUME_ROUND:
        this worker's own part is loaded, exactly), or a rejoin after a failure (the coordinator says
        from which version; this worker's newest checkpoint part, if any, restores optimizer and data).
        """
        flat = None
        header = torch.zeros(2, dtype=torch.int64)  # global version, this site's merges so far (async)
        if self.ctx.is_leader:
            resp = self.client.join(self.ctx.workers)
            header[1] = resp.site_merges
            if not resp.has_model:
                self.client.init_model(flatten(self.params))
            payload = self.client.get_model(min_version=resp.start_version)
            flat = payload.tensor()
            header[0] = payload.version
            self._ring_next = payload.ring_round  # a restarted leader: the others may be rebuilding rings now
            self._frag_rounds = list(resp.fragment_rounds) or [payload.version]
            self.events.emit("site_ready", site=self.ctx.site, version=payload.version, round=resp.round,
                             epoch=resp.epoch)
        header = self._site_broadcast(header)
        self.version = int(header[0])
        self.round = self.version
        self.global_flat = self._site_broadcast(flat, like=self.params).clone()
        unflatten_into(self.global_flat, self.params)
        if self.algorithm == "streaming-diloco":
            fr = torch.tensor(getattr(self, "_frag_rounds", [0] * self.P), dtype=torch.int64)
            self._frag_rounds = [int(x) for x in self._site_broadcast(fr)]
            self.round = min(self._frag_rounds)
        elif self.algorithm == "async-diloco":
            self.round = int(header[1])  # async: a site counts its own merges (the coordinator kept count)
        self._restore_own_state()
        self.local_step = self.round * self.H

    def _restore_own_state(self) -> None:
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

    def _merge(self) -> None:
        """Pseudo-gradient out, new global parameters in (DiLoCo, Algorithm 1, lines 8-12)."""
        t0 = time.perf_counter()
        new = None
        header = torch.zeros(1, dtype=torch.int64)
        if self.ctx.is_leader:
            pseudo_grad = self.global_flat - flatten(self.params)
            sent0, recv0 = self.client.bytes_sent, self.client.bytes_received
            if not self._rings and self.ctx.rings and self._ring_next == self.round:
                self._rebuild_rings()
            ring_result = self._ring_exchange(pseudo_grad) if self._rings else None
            new, version = ring_result if ring_result is not None else self._exchange(pseudo_grad, self.global_flat)
            header[0] = version
        version = int(self._site_broadcast(header)[0])
        new = self._site_broadcast(new, like=self.params)
        unflatten_into(new, self.params)
        self.global_flat = new.clone()
        seconds = time.perf_counter() - t0
        self.wan_wait_s += seconds
        if self.ctx.is_leader:
            self._emit_merge(version, sent0, recv0, seconds)
        if self.algorithm == "async-diloco":  # our own count of merges; the version is the coordinator's
            self.version = version
            self.round += 1
            return
        if version != self.round + 1:  # caught up: the rounds in between were committed without us
            self.local_step = version * self.H
        self.round = version

    # ---- async-diloco with overlap ----
    def _async_send(self) -> None:
        """Start this round's merge in the background; training goes on for τ steps meanwhile."""
        future, sent = None, (0, 0)
        if self.ctx.is_leader:
            pseudo_grad = self.global_flat - flatten(self.params)
            sent = (self.client.bytes_sent, self.client.bytes_received)
            future = self._pool.submit(self._exchange, pseudo_grad, self.global_flat.clone())
        self._pending = (future, self.local_step + self.tau, time.perf_counter(), flatten(self.params).clone(), sent)

    def _async_finish(self) -> None:
        """The merge's answer is in: θ ← θ_global_new + (θ − θ_at_send). The τ steps' progress is kept,
        and goes to the coordinator with the next update (whose base is θ_global_new)."""
        future, _due, t0, at_send, (sent0, recv0) = self._pending
        self._pending = None
        t_wait = time.perf_counter()
        new = None
        header = torch.zeros(1, dtype=torch.int64)
        if self.ctx.is_leader:
            new, version = future.result()
            header[0] = version
        version = int(self._site_broadcast(header)[0])
        new = self._site_broadcast(new, like=self.params)
        unflatten_into(new + (flatten(self.params) - at_send), self.params)
        self.global_flat = new.clone()
        waited = time.perf_counter() - t_wait  # only what the τ steps did not hide
        self.wan_wait_s += waited
        if self.ctx.is_leader:
            self._emit_merge(version, sent0, recv0, waited, exchange_s=round(time.perf_counter() - t0, 6))
        self.version = version
        self.round += 1

    def _emit_merge(self, version: int, sent0: int, recv0: int, seconds: float, **extra) -> None:
        """The leader's `merge` event for a whole-model merge. `round` is the round whose commit
        produced the weights we now hold (version - 1; after a catch-up, or in async, not ours)."""
        self.events.emit("merge", site=self.ctx.site, round=version - 1, version=version, site_round=self.round,
                         bytes_sent=self.client.bytes_sent - sent0, bytes_received=self.client.bytes_received - recv0,
                         seconds=round(seconds, 6), step=self.local_step, crc32=fingerprint(self.global_flat),
                         codec=self.codec, **extra)

    # ---- ring / hierarchical merges ----
    def _connect_rings(self, timeout_s: float = 60.0, momentum: torch.Tensor | None = None,
                       started: float | None = None) -> None:
        """Build this leader's rings (geotrain.wan.merge_plan); the outer step then runs here too, mirrored
        (from ``momentum``, the coordinator's outer momentum, when the rings are rebuilt mid-run: always
        at a round > 0, since the coordinator's ring_round is the round after a star round)."""
        from geotrain.orchestrator.outer import OuterOptimizer
        from geotrain.wan.ring import RingPeer
        from geotrain.config.topology import OuterOptimizerConfig

        t0 = time.perf_counter() if started is None else started
        try:
            for m in self.ctx.rings:
                peer = RingPeer(m["rank"], m["world"], listen=("127.0.0.1", m["listen"]), timeout_s=timeout_s)
                peer.start()
                self._rings[m["ring"]] = peer
            for m in self.ctx.rings:
                host, port = m["successor"].rsplit(":", 1)
                self._rings[m["ring"]].connect((host, int(port)))
        except GeotrainError as exc:
            self._abandon_rings(f"could not build the rings: {exc}")
            return
        cfg = self.ctx.outer_optimizer or {}
        self._outer_local = OuterOptimizer(OuterOptimizerConfig(**cfg))
        self._outer_local.buf = momentum
        self.events.emit("rings_ready", site=self.ctx.site, rings=sorted(self._rings), round=self.round,
                         rebuilt=self.round > 0, seconds=round(time.perf_counter() - t0, 6))

    def _rebuild_rings(self) -> None:
        """The coordinator said: every site merged the last round through the star, rebuild the rings
        for this one. The ring's outer step is mirrored here, so first fetch the coordinator's outer
        momentum as of this round (the star rounds moved it). Any failure: this round goes through the star."""
        t0 = time.perf_counter()
        try:
            p = self.client.get_model(min_version=self.round, what="momentum")
        except GeotrainError as exc:
            self.events.emit("ring_abandoned", site=self.ctx.site, round=self.round, reason=f"no outer momentum: {exc}")
            return
        if p.version != self.round:  # the round moved on without us: not a ring round any more
            self.events.emit("ring_abandoned", site=self.ctx.site, round=self.round,
                             reason=f"the coordinator is at version {p.version}, not {self.round}")
            return
        momentum = p.tensor().clone() if p.numel else None
        self._connect_rings(timeout_s=REBUILD_TIMEOUT_S, momentum=momentum, started=t0)

    def _abandon_rings(self, reason: str) -> None:
        for peer in self._rings.values():
            peer.close()
        if self._rings:
            self.events.emit("ring_abandoned", site=self.ctx.site, round=self.round, reason=reason)
        self._rings = {}

    def _ring_exchange(self, pseudo_grad: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """All-reduce the pseudo-gradient among leaders, step the mirrored outer optimizer, have the
        coordinator confirm. None: the ring failed, merge this round through the star."""
        from geotrain.wan.ring import hierarchical_all_reduce

        local = next((p for name, p in self._rings.items() if name.startswith("region:")), None)
        leaders = self._rings.get("leaders") or self._rings.get("all")
        try:
            mean = hierarchical_all_reduce(pseudo_grad, local=local, leaders=leaders, world=self.ctx.num_sites,
                                           op="mean", round=self.round, codec=self.codec, block=self.block)
            claimed = fingerprint(mean)
            upload = self.ctx.site == self.ctx.ring_uploader
            p = self.client.merge(mean if upload else torch.zeros(0), round=self.round,
                                  kind="ring_mean" if upload else "ring_ack", version=self.round, claimed_crc32=claimed)
            new = self._outer_local.step(self.global_flat, mean)
            if p.kind != "ring_commit" or p.params_crc32 != fingerprint(new):
                raise TransferCorrupt(f"site {self.ctx.site}, round {self.round}: after the ring merge the coordinator "
                                      f"holds weights with CRC32 {p.params_crc32}, this site {fingerprint(new)}")
            return new, p.version
        except GeotrainError as exc:
            self._abandon_rings(str(exc))
            return None

    def _encode_update(self, update: torch.Tensor, key: int = 0):
        """Compress an update for the wire (with this site's error feedback), or None for fp32."""
        if self.codec == "fp32":
            return None
        from geotrain.wire.compress import ErrorFeedback, encode

        if not self.error_feedback:
            return encode(update, self.codec, self.block)
        ef = self._ef.setdefault(key, ErrorFeedback(update.numel()))
        return ef.encode(update, self.codec, self.block)

    def _exchange(self, pseudo_grad: torch.Tensor, base: torch.Tensor, fragment: int = 0,
                  at_round: int | None = None) -> tuple[torch.Tensor, int]:
        """Send this round's update and get the committed global parameters, surviving a coordinator restart.

        Returns (new global parameters for ``base``'s elements, global version).
        - coordinator unreachable: retry the same update with backoff (until recovery.retry_deadline_s);
          if the round was committed meanwhile, the retry is refused as stale and we fetch the result;
        - our update is refused (stale, or we were dropped from the round): rejoin and fetch the current
          global model; the local progress of this round is discarded, never applied late;
        - duplicate (the coordinator has our update, the reply was lost): wait for the commit.
        """
        rnd = self.round if at_round is None else at_round
        base_version = self.version if self.algorithm == "async-diloco" else rnd
        encoded = self._encode_update(pseudo_grad, fragment)
        deadline = time.monotonic() + self.ctx.retry_deadline_s
        delay, failed_at = 0.2, None
        sl = self._slices[fragment] if self._slices else slice(None)
        while True:
            try:
                p = self.client.merge(None if encoded is not None else pseudo_grad, round=rnd, kind="pseudo_grad",
                                      version=base_version, encoded=encoded, fragment=fragment)
                new = base + p.tensor() if p.kind == "delta" else p.tensor()
                result = (new, p.version)
                self._ring_next = p.ring_round
                self._exchange_bytes[fragment] = (len(encoded.payload) if encoded is not None else pseudo_grad.numel() * 4,
                                                  p.wire_bytes)
            except (QuorumLost, CoordinatorUnavailable) as exc:
                if isinstance(exc, QuorumLost):  # too few sites reported in time: the round reopens, send again
                    self.events.emit("round_retry", site=self.ctx.site, round=rnd, reason=str(exc))
                elif failed_at is None:
                    failed_at = time.time()
                    self.events.emit("failure", what="coordinator", target="coordinator", happened_t=failed_at,
                                     detected_t=failed_at, reason=str(exc), site=self.ctx.site)
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except StaleRound as exc:
                if "duplicate" in str(exc):
                    p = self.client.get_model(min_version=self.version + 1)
                else:
                    self.events.emit("merge_discarded", site=self.ctx.site, round=rnd, reason=str(exc))
                    resp = self.client.join(self.ctx.workers)
                    p = self.client.get_model(min_version=resp.start_version)
                    if self._slices and resp.fragment_rounds:  # streaming: the round this fragment goes on from
                        self._rejoined[fragment] = int(resp.fragment_rounds[fragment])
                self._ef.pop(fragment, None)  # what error feedback held belonged to the discarded update
                result = (p.tensor()[sl].clone(), p.version)
                self._ring_next = p.ring_round
            if failed_at is not None:
                now = time.time()
                self.events.emit("recovery", what="coordinator", target="coordinator", failure_t=failed_at,
                                 recovered_t=now, seconds=round(now - failed_at, 3), site=self.ctx.site,
                                 rounds_lost=0)
            return result

    # ---- Streaming DiLoCo (arXiv 2501.18512) ----
    def _stream_step(self) -> bool:
        """Finish the fragment exchanges due now, then start the ones whose turn it is."""
        finished = False
        for frag, (future, due, t0) in list(self._inflight.items()):
            if self.local_step >= due:
                self._finish_fragment(frag, future, t0)
                finished = True
        for frag in sorted(range(self.P), key=self._due):
            if self.local_step >= self._due(frag) and frag not in self._inflight \
                    and self._frag_rounds[frag] < self.ctx.rounds:
                sl = self._slices[frag]
                future = None
                if self.ctx.is_leader:
                    local = flatten(self.params)[sl]
                    pseudo = self.global_flat[sl] - local
                    base = self.global_flat[sl].clone()
                    future = self._pool.submit(self._exchange, pseudo, base, frag, self._frag_rounds[frag])
                self._inflight[frag] = (future, self.local_step + self.tau, time.perf_counter())
                if self.tau == 0:
                    self._finish_fragment(frag, future, time.perf_counter())
                    finished = True
        return finished

    def _due(self, frag: int) -> int:
        """The local step at which fragment ``frag`` sends its next round: round r of fragment p is
        due at r·H + (p+1)·H/P (fragment P-1 at the end of the round)."""
        return self._frag_rounds[frag] * self.H + (self._offsets[frag] or self.H)

    def _stream_realign(self) -> None:
        """Put the local step where this site's fragment rounds say it is: just after the latest
        fragment that was due. A site that (re)joins with rounds [1, 1, 1, 0] must send fragment 3
        of round 0 before fragment 0 of round 1, as the other sites do, or each waits for the other."""
        self.local_step = max(self.local_step, max(self._due(f) for f in range(self.P)) - self.H)

    def _finish_fragment(self, frag: int, future, t0: float) -> None:
        sl = self._slices[frag]
        t_wait = time.perf_counter()
        new = None
        header = torch.tensor([self._frag_rounds[frag] + 1], dtype=torch.int64)
        if self.ctx.is_leader:
            new, _version = future.result()
            sent, received = self._exchange_bytes.pop(frag, (0, 0))
            header[0] = self._rejoined.pop(frag, int(header[0]))
        next_round = int(self._site_broadcast(header)[0])
        numel = sl.stop - sl.start
        new = self._site_broadcast(new if new is not None else None, like=None, numel=numel)
        local = flatten(self.params)
        mixed = local.clone()
        mixed[sl] = self.alpha * local[sl] + (1.0 - self.alpha) * new
        unflatten_into(mixed, self.params)
        self.global_flat[sl] = new
        waited = time.perf_counter() - t_wait  # only the part of the exchange that compute did not hide
        self.wan_wait_s += waited
        self._step_wan_s += waited
        del self._inflight[frag]
        if self.ctx.is_leader:
            self.events.emit("merge", site=self.ctx.site, round=self._frag_rounds[frag], fragment=frag,
                             version=self._frag_rounds[frag] + 1, seconds=round(waited, 6),
                             exchange_s=round(time.perf_counter() - t0, 6), step=self.local_step,
                             bytes_sent=sent, bytes_received=received,
                             codec=self.codec, crc32=fingerprint(new))
        self._frag_rounds[frag] = next_round  # one more, or where a rejoin after a discarded update put us
        self._stream_realign()
        self.round = min(self._frag_rounds)

    def fetch_global(self, min_version: int) -> int | None:
        """Wait until the coordinator holds global version >= ``min_version`` and take it as this site's
        global parameters (see :meth:`global_parameters`); the model's own parameters are left alone.
        Every rank of the site calls it. Returns the version, or None when the coordinator could not
        provide it (an event says why). For an evaluation of the final model of an asynchronous run,
        whose sites finish at different times."""
        header = torch.tensor([-1], dtype=torch.int64)
        flat = None
        if self.ctx.is_leader:
            try:
                p = self.client.get_model(min_version=min_version)
                flat, header[0] = p.tensor(), p.version
            except GeotrainError as exc:
                self.events.emit("fetch_failed", site=self.ctx.site, min_version=min_version, reason=str(exc))
        version = int(self._site_broadcast(header)[0])
        if version < 0:
            return None
        self.global_flat = self._site_broadcast(flat, like=self.params).clone()
        return version

    def global_parameters(self):
        """Context manager: the model holds the global parameters inside (for evaluation), its own after."""
        from contextlib import contextmanager

        @contextmanager
        def swap():
            local = flatten(self.params)
            unflatten_into(self.global_flat, self.params)
            try:
                yield self.model
            finally:
                unflatten_into(local, self.params)

        return swap()

    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Average gradients inside the site (and, for ddp, across sites) before the inner step."""
        self.last_step_wan_s = 0.0
        if self.ctx.workers == 1 and self.algorithm != "ddp":
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.ctx.workers > 1:
            dist.all_reduce(flat)
            flat /= self.ctx.workers
        if self.algorithm == "ddp":
            t0 = time.perf_counter()
            merged = None
            if self.ctx.is_leader:
                sent0, recv0 = self.client.bytes_sent, self.client.bytes_received
                merged = self.client.merge(flat.cpu(), round=self.local_step, kind="grad").tensor()
            flat = self._site_broadcast(merged, like=self.params).to(flat.device)
            seconds = time.perf_counter() - t0
            self._step_wan_s += seconds
            self.wan_wait_s += seconds
            self.last_step_wan_s = seconds
            if self.ctx.is_leader:
                self.events.emit("merge", site=self.ctx.site, round=self.round, step=self.local_step + 1,
                                 bytes_sent=self.client.bytes_sent - sent0,
                                 bytes_received=self.client.bytes_received - recv0, seconds=round(seconds, 6))
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def _site_broadcast(self, tensor: torch.Tensor | None, like=None, numel: int | None = None) -> torch.Tensor:
        """Rank 0's tensor on every rank of the site (a no-op for one-worker sites)."""
        if self.ctx.workers == 1:
            return tensor
        if tensor is None:
            numel = numel if numel is not None else sum(p.numel() for p in like)
            tensor = torch.empty(numel, dtype=torch.float32)
        dev = "cuda" if self.ctx.device == "cuda" else "cpu"
        buf = tensor.to(dev)
        dist.broadcast(buf, src=0)
        return buf.cpu()
