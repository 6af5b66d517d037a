"""The coordinator's channel is mutual TLS, and a site acts only as itself (issue #11, items 1-2).

A real gRPC server with real certificates (geotrain.security.pki) on 127.0.0.1; every refusal is
checked for its kind: a handshake that fails (no certificate, another CA) never reaches the servicer,
a certificate of the run that asks for what it may not have is refused FORBIDDEN naming why."""

import grpc
import pytest
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import Forbidden
from geotrain.orchestrator.authz import authorize
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.rounds import RoundState
from geotrain.orchestrator.server import create_server
from geotrain.security.pki import CA_CERT, CA_KEY, init_certs, site_name
from geotrain.security.tls import channel_credentials, secure_channel
from geotrain.worker.client import CoordinatorClient

SITES = ("paris", "tokyo")


@pytest.fixture
def run(tmp_path):
    certs = init_certs(tmp_path / "certs", SITES, run="t")
    init_certs(tmp_path / "certs", (), names=["site.mars"], ca_cert=certs.path / CA_CERT, ca_key=certs.path / CA_KEY)
    other = init_certs(tmp_path / "other", SITES, run="t")  # another CA, the same names
    engine = CoordinatorEngine(EngineConfig(sites=SITES))
    server, port = create_server(engine, tls=certs.files("coordinator"))
    yield certs, other, engine, f"127.0.0.1:{port}"
    server.stop(grace=0)


def _status(channel):
    return pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=5)


def test_a_client_without_a_certificate_cannot_even_connect(run):
    certs, _, _, address = run
    with pytest.raises(grpc.RpcError) as info:
        _status(grpc.insecure_channel(address))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # TLS that trusts the run's CA but presents no certificate of its own: the server requires one
    creds = grpc.ssl_channel_credentials(root_certificates=(certs.path / CA_CERT).read_bytes())
    with pytest.raises(grpc.RpcError) as info:
        _status(grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "coordinator")]))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused_both_ways(run):
    certs, other, _, address = run
    with pytest.raises(grpc.RpcError) as info:  # the server does not trust the client
        _status(secure_channel(address, other.files(site_name("paris"))))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # and a client of the run does not trust a server of another CA: start one and dial it
    engine = CoordinatorEngine(EngineConfig(sites=SITES))
    server, port = create_server(engine, tls=other.files("coordinator"))
    try:
        with pytest.raises(grpc.RpcError) as info:
            _status(secure_channel(f"127.0.0.1:{port}", certs.files(site_name("paris"))))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_a_site_acts_only_as_itself(run):
    certs, _, engine, address = run
    impostor = CoordinatorClient(address, "tokyo", tls=certs.files(site_name("paris")), retry_deadline_s=1)
    with pytest.raises(Forbidden, match="the caller is site 'paris' .* but the request is for site 'tokyo'"):
        impostor.join(1)
    with pytest.raises(Forbidden, match="a site may act only as itself"):
        impostor.init_model(torch.zeros(4))
    with pytest.raises(Forbidden):
        impostor.merge(torch.zeros(4), round=0, kind="pseudo_grad")
    assert engine.params is None and "tokyo" not in engine.joined  # nothing it sent counted
    impostor.close()
    paris = CoordinatorClient(address, "paris", tls=certs.files(site_name("paris")))
    assert paris.join(1).round == 0
    assert paris.init_model(torch.zeros(4))
    assert paris.get_model(0).tensor().numel() == 4
    assert paris.status().round == 0
    paris.close()


def test_only_sites_of_the_topology_and_members(run):
    certs, _, engine, address = run
    mars = CoordinatorClient(address, "mars", tls=certs.files("site.mars"), retry_deadline_s=1)
    with pytest.raises(Forbidden, match="site 'mars', which is not in the topology"):
        mars.init_model(torch.full((4,), float("nan")))
    with pytest.raises(Forbidden):
        mars.get_model(0)
    mars.close()
    launcher = CoordinatorClient(address, "paris", tls=certs.files("launcher"), retry_deadline_s=1)
    assert launcher.status().round == 0  # any part of the run may ask for the status
    with pytest.raises(Forbidden, match="only a site may call it"):
        launcher.get_model(0)
    launcher.close()
    # tokyo left the run (dropped from every round, never joined this incarnation): no model for it
    for lane in engine.lanes:
        lane.state = RoundState(round=0, expected=frozenset({"paris"}))
    tokyo = CoordinatorClient(address, "tokyo", tls=certs.files(site_name("tokyo")), retry_deadline_s=1)
    with pytest.raises(Forbidden, match="not a member"):
        tokyo.get_model(0)
    tokyo.close()


def test_the_health_service_needs_a_certificate_too(run):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    certs, _, _, address = run
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=5)
    channel = grpc.secure_channel(address, channel_credentials(certs.files("launcher")),
                                  options=[("grpc.ssl_target_name_override", "coordinator")])
    ok = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("call, caller, claimed, members, allowed", [
    ("Join", "site.a", "a", set(), True),
    ("Join", "site.a", "b", set(), False),
    ("Join", "launcher", "a", set(), False),
    ("Join", None, "a", set(), False),
    ("Join", "site.z", "z", set(), False),
    ("GetModel", "site.a", "a", {"a"}, True),
    ("GetModel", "site.a", "a", set(), False),
    ("Status", "launcher", None, set(), True),
    ("Status", "coordinator", None, set(), True),
    ("Status", "site.z", None, set(), False),
    ("Delete", "site.a", "a", set(), False),
])
def test_authorize_table(call, caller, claimed, members, allowed):
    v = authorize(call, caller, claimed, sites=frozenset({"a", "b"}), members=frozenset(members))
    assert bool(v) is allowed, v.reason
    assert authorize(call, caller, claimed, sites=frozenset({"a", "b"}), tls=False)  # plaintext: no identity
