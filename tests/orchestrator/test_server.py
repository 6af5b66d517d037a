"""The coordinator servicer with real gRPC on loopback: failed rounds reopen, results are encoded once."""

import threading

import grpc
import pytest
import torch

from geotrain.errors import QuorumLost
from geotrain.orchestrator.server import CoordinatorConfig, CoordinatorService, create_server
from geotrain.worker.client import CoordinatorClient


def test_a_failed_round_reopens_and_late_updates_start_a_new_attempt():
    service = CoordinatorService(CoordinatorConfig(sites=("a", "b", "c"), algorithm="ddp", round_timeout_s=0.5, min_sites=3))
    server, port = create_server(service)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10)
        with pytest.raises(QuorumLost, match="fewer than the 3 required"):
            a.merge(torch.ones(4), round=0, kind="grad")
        assert service.lanes[0].attempt == 1 and not service.state.arrived  # reopened, nothing left behind
        results = {}

        def send(name, value):
            results[name] = CoordinatorClient(f"127.0.0.1:{port}", name, timeout_s=10).merge(
                torch.full((4,), value), round=0, kind="grad").tensor()

        threads = [threading.Thread(target=send, args=(n, v)) for n, v in (("a", 1.0), ("b", 2.0), ("c", 6.0))]
        [t.start() for t in threads]
        [t.join(20) for t in threads]
        assert all(torch.equal(r, torch.full((4,), 3.0)) for r in results.values()) and len(results) == 3
        assert service.state.round == 1
    finally:
        server.stop(0)
