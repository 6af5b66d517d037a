"""Each merge mode's arithmetic against a direct computation, through the real gRPC coordinator.

Sites are threads with one worker each (SiteContext), their inner steps are known in advance
(a fake gradient), and the expected weights are computed here independently, in float64 where
the protocol is exact, with geotrain.wire.compress's codec where the protocol quantises.
"""

import threading

import pytest
import torch

from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.server import create_server
from geotrain.wire.fragments import fragment_slices
from geotrain.config.components import WorkerConfig
from geotrain.sdk import DiLoCo, SiteContext
from geotrain.config.topology import OuterOptimizerConfig

LR_IN, LR_OUT, MU = 0.1, 0.7, 0.9


def fake_grad(site: int, step: int, w: torch.Tensor) -> torch.Tensor:
    return 0.05 * (site + 1) * (step % 3 + 1) * torch.ones_like(w) + 0.1 * w


def start(cfg: EngineConfig):
    service = CoordinatorEngine(cfg)
    server, port = create_server(service)
    return service, server, port


def site(port, name, w0, **ctx_fields):
    lin = torch.nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    opt = torch.optim.SGD(lin.parameters(), lr=LR_IN)
    ctx = SiteContext(run="t", site=name, rank=0, workers=1, coordinator=f"127.0.0.1:{port}",
                      config=WorkerConfig(**ctx_fields))
    return lin, opt, ctx


WEIGHTS = {"inverse": lambda s, n: 1.0 / (1.0 + s), "excess": lambda s, n: 1.0 / (1.0 + max(0, s - (n - 1))),
           "none": lambda s, n: 1.0}


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_async_delayed_nesterov_with_staleness_weights(kind):
    sites, H, merges = ["a", "b"], 2, 3
    service, server, port = start(EngineConfig(sites=tuple(sites), algorithm="async-diloco", staleness_weight=kind))
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    models = [site(port, s, w0) for s in sites]
    dls = [DiLoCo(lin, opt, inner_steps=H, algorithm="async-diloco", context=ctx) for lin, opt, ctx in models]
    # expected, computed directly: site order a, b, a, b, ... ; each update based on the version the site last saw
    theta = w0.double().clone()
    seen = {0: (theta.clone(), 0), 1: (theta.clone(), 0)}  # site -> (its global copy, version it is based on)
    local = {0: theta.clone(), 1: theta.clone()}
    version, buf, acc, count = 0, None, None, 0
    step = {0: 0, 1: 0}
    for _ in range(merges):
        for i in (0, 1):
            lin, opt, _ = models[i]
            for k in range(H):  # the real site
                lin.weight.grad = fake_grad(i, step[i] + k, lin.weight.detach())
                opt.step()
                dls[i].step()
            for _ in range(H):  # the direct computation
                local[i] = local[i] - LR_IN * fake_grad(i, step[i], local[i].float()).double()
                step[i] += 1
            base, base_version = seen[i]
            delta = base - local[i]
            w = WEIGHTS[kind](version - base_version, len(sites))
            g = w * delta
            theta = theta - (LR_OUT / 2) * g
            acc = g.clone() if acc is None else acc + g
            count += 1
            if count == 2:
                mean = acc / 2
                buf = mean.clone() if buf is None else MU * buf + mean
                theta = theta - LR_OUT * MU * buf
                acc, count = None, 0
            version += 1
            seen[i] = (theta.clone(), version)
            local[i] = theta.clone()
            assert torch.allclose(lin.weight.detach().double(), theta, atol=1e-5, rtol=0), (i, version)
    commits = service.version
    for dl in dls:
        dl.close()
    server.stop(0)
    assert commits == 2 * merges


def test_async_overlap_puts_the_overlapped_steps_on_the_new_global_model():
    """async-diloco with overlap_steps=τ: the update sent at step kH is based on the global model the
    site last received; the τ steps run meanwhile are then put on top of the answer, and go with the
    next update. The run's last merge is waited for."""
    sites, H, tau, rounds = ["a", "b"], 3, 1, 3
    service, server, port = start(EngineConfig(sites=tuple(sites), algorithm="async-diloco"))
    torch.manual_seed(1)
    w0 = torch.randn(4, 3)
    models = [site(port, s, w0, overlap_steps=tau, rounds=rounds) for s in sites]
    dls = [DiLoCo(lin, opt, inner_steps=H, algorithm="async-diloco", context=ctx) for lin, opt, ctx in models]
    assert all(dl.overlapped for dl in dls)
    theta = w0.double().clone()
    state = {"version": 0, "buf": None, "acc": None, "count": 0}
    base = {i: (theta.clone(), 0) for i in (0, 1)}  # site -> (global copy, its version)
    local = {i: theta.clone() for i in (0, 1)}
    step = {0: 0, 1: 0}

    def apply(i):  # the coordinator: delayed Nesterov with the staleness weight, as in the test above
        nonlocal theta
        b, bv = base[i]
        g = (1.0 / (1.0 + (state["version"] - bv))) * (b - local[i])
        theta = theta - (LR_OUT / 2) * g
        state["acc"] = g.clone() if state["acc"] is None else state["acc"] + g
        state["count"] += 1
        if state["count"] == 2:
            mean = state["acc"] / 2
            state["buf"] = mean.clone() if state["buf"] is None else MU * state["buf"] + mean
            theta = theta - LR_OUT * MU * state["buf"]
            state["acc"], state["count"] = None, 0
        state["version"] += 1
        return theta.clone(), state["version"]

    def steps(i, n):
        lin, opt, _ = models[i]
        for _ in range(n):
            lin.weight.grad = fake_grad(i, step[i], lin.weight.detach())
            opt.step()
            dls[i].step()
            local[i] = local[i] - LR_IN * fake_grad(i, step[i], local[i].float()).double()
            step[i] += 1

    for rnd in range(rounds):
        for i in (0, 1):
            steps(i, H if rnd == 0 else H - tau)  # up to the step that sends
            new, version = apply(i)
            if rnd == rounds - 1:  # waited for
                local[i] = new.clone()
            else:
                at_send = local[i].clone()
                steps(i, tau)  # overlapped; the answer is taken at the last of these
                local[i] = new + (local[i] - at_send)
            base[i] = (new, version)
            assert torch.allclose(models[i][0].weight.detach().double(), local[i], atol=1e-5, rtol=0), (i, rnd)
            assert torch.allclose(dls[i].global_flat.double(), new.reshape(-1), atol=1e-5, rtol=0), (i, rnd)
    assert [dl.round for dl in dls] == [rounds, rounds] and service.version == 2 * rounds
    for dl in dls:
        dl.close()
    server.stop(0)


def test_streaming_fragments_with_mixing_match_a_direct_computation():
    sites, H, P, alpha, rounds = ["a", "b"], 4, 2, 0.5, 3
    service, server, port = start(EngineConfig(sites=tuple(sites), algorithm="streaming-diloco", fragments=P))
    torch.manual_seed(1)
    w0 = torch.randn(4, 3)
    results, errors = {}, []

    def run(i, name):
        try:
            lin, opt, ctx = site(port, name, w0, fragments=P, overlap_steps=0, alpha=alpha, rounds=rounds)
            if i == 1:
                threading.Event().wait(0.3)
            with DiLoCo(lin, opt, inner_steps=H, algorithm="streaming-diloco", context=ctx) as dl:
                for step in range(rounds * H):
                    lin.weight.grad = fake_grad(i, step, lin.weight.detach())
                    opt.step()
                    dl.step()
                results[name] = (lin.weight.detach().clone(), dl.global_flat.clone())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sites)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    server.stop(0)
    assert not errors, errors
    # direct computation
    theta = w0.double().reshape(-1).clone()
    local = [theta.clone(), theta.clone()]
    buf = torch.zeros_like(theta)
    slices = fragment_slices(theta.numel(), P)
    offsets = [((f + 1) * H // P) % H for f in range(P)]
    for step in range(1, rounds * H + 1):
        for i in (0, 1):
            w = local[i].reshape(4, 3)
            local[i] = (w - LR_IN * fake_grad(i, step - 1, w.float()).double()).reshape(-1)
        for f in range(P):
            if step % H == offsets[f]:
                sl = slices[f]
                mean = sum(theta[sl] - local[i][sl] for i in (0, 1)) / 2
                buf[sl] = MU * buf[sl] + mean
                theta[sl] = theta[sl] - LR_OUT * (mean + MU * buf[sl])
                for i in (0, 1):
                    local[i][sl] = alpha * local[i][sl] + (1 - alpha) * theta[sl]
    for i, name in enumerate(sites):
        got_local, got_global = results[name]
        assert torch.allclose(got_global.double(), theta, atol=1e-5, rtol=0), name
        assert torch.allclose(got_local.reshape(-1).double(), local[i], atol=1e-5, rtol=0), name
    assert [l.state.round for l in service.lanes] == [rounds] * P


def test_int8_merge_with_error_feedback_matches_the_protocol():
    from geotrain.wire.compress import ErrorFeedback, decode

    sites, H, rounds = ["a", "b"], 3, 3
    service, server, port = start(EngineConfig(sites=tuple(sites), codec="int8", block=4))
    torch.manual_seed(2)
    w0 = torch.randn(4, 3)
    seen, errors = {s: [] for s in sites}, []

    def run(i, name):
        try:
            lin, opt, ctx = site(port, name, w0, codec="int8", block=4)
            if i == 1:
                threading.Event().wait(0.3)
            with DiLoCo(lin, opt, inner_steps=H, context=ctx) as dl:
                for step in range(rounds * H):
                    lin.weight.grad = fake_grad(i, step, lin.weight.detach())
                    opt.step()
                    if dl.step():
                        seen[name].append(lin.weight.detach().reshape(-1).clone())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sites)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    server.stop(0)
    assert not errors, errors
    theta = w0.reshape(-1).clone()
    ef_up = [ErrorFeedback(12), ErrorFeedback(12)]
    ef_down = ErrorFeedback(12)
    buf = None
    for r in range(rounds):
        ups = []
        for i in (0, 1):
            w = theta.reshape(4, 3).clone()
            for k in range(H):
                w = w - LR_IN * fake_grad(i, r * H + k, w)
            ups.append(decode(ef_up[i].encode(theta - w.reshape(-1), "int8", 4)))
        mean = (ups[0] + ups[1]) / 2
        buf = mean.clone() if buf is None else buf * MU + mean
        new = theta - LR_OUT * (mean + MU * buf)
        theta = theta + decode(ef_down.encode(new - theta, "int8", 4))
        for name in sites:
            assert torch.allclose(seen[name][r], theta, atol=1e-5, rtol=0), (name, r)
    assert torch.equal(seen["a"][-1], seen["b"][-1])  # both sites hold identical bits
