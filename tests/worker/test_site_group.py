"""SiteGroup: the site's collectives and "the leader asks, everyone gets the answer"."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from geotrain.worker.site_group import SiteGroup


def test_a_one_worker_site_hands_back_what_the_leader_got():
    group = SiteGroup(workers=1, rank=0)
    t = torch.arange(3.0)
    ints, got = group.leader_then_broadcast(lambda: ([4, 5], t), ints=2, numel=3)
    assert ints == [4, 5] and got is t
    assert group.leader_then_broadcast(lambda: ([-1], None), ints=1, numel=3) == ([-1], None)
    flat = torch.ones(2)
    assert group.all_reduce_mean(flat) is flat and torch.equal(flat, torch.ones(2))
    group.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = SiteGroup(workers=2, rank=rank)
        calls = []

        def leader_only():
            calls.append(rank)
            return [7, 8], torch.tensor([1.5, -2.0, 3.25])

        ints, got = group.leader_then_broadcast(leader_only, ints=2, numel=3)
        none_ints, none = group.leader_then_broadcast(lambda: ([-1], None), ints=1, numel=3)
        mean = group.all_reduce_mean(torch.full((2,), float(rank + 1)))
        group.barrier()
        results.put((rank, calls, ints, got.tolist(), none_ints, none, mean.tolist(), group.is_leader))
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_the_leaders_answer_and_only_the_leader_asks():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank, calls, ints, values, none_ints, none, mean, leader in got:
        assert calls == ([0] if rank == 0 else [])
        assert ints == [7, 8] and values == [1.5, -2.0, 3.25]
        assert none_ints == [-1] and none is None
        assert mean == [1.5, 1.5] and leader == (rank == 0)
