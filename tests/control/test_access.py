"""How each part reaches etcd (geotrain.control.access) and who may write what (geotrain.control.auth): pure tables."""

from __future__ import annotations

import pytest

from geotrain.config.schema import EtcdConfig
from geotrain.control.access import EXTERNAL_CLIENT, etcd_access
from geotrain.control.auth import grants, may_write
from geotrain.control.etcd_client import endpoint_scheme, parse_endpoint
from geotrain.errors import ControlPlaneError
from geotrain.security.pki import ETCD, init_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return init_certs(tmp_path_factory.mktemp("pki") / "certs", ["a"], run="r")


def test_endpoints_with_and_without_a_scheme():
    assert parse_endpoint("https://etcd:2379") == ("etcd", 2379)
    assert endpoint_scheme("https://etcd:2379") == "https"
    assert endpoint_scheme("HTTP://etcd:1") == "http"
    assert endpoint_scheme("etcd:1") == ""
    with pytest.raises(ControlPlaneError, match="not supported"):
        parse_endpoint("unix://etcd:1")


def test_an_etcd_of_the_run_is_reached_with_the_parts_own_certificate(certs):
    a = etcd_access("127.0.0.1:2379", "site.a", certs_dir=certs.path, etcd=EtcdConfig())
    assert a.tls.name == "site.a" and a.tls.cert == certs.path / "site.a.pem"
    assert a.server_name == ETCD and a.url == "https://127.0.0.1:2379"
    assert etcd_access("https://h:1", "coordinator", certs_dir=certs.path).tls.name == "coordinator"


def test_plaintext_only_when_asked_or_tls_is_off(certs):
    assert etcd_access("http://h:1", "site.a", certs_dir=certs.path).tls is None
    off = etcd_access("h:1", "site.a", certs_dir=None)
    assert off.tls is None and "security.tls is false" in off.reason
    with pytest.raises(ControlPlaneError, match="security.tls is false"):
        etcd_access("https://h:1", "site.a", certs_dir=None)


def test_an_external_etcd_uses_the_topologys_files_or_is_plaintext(certs, tmp_path):
    f = certs.files("launcher")
    ext = EtcdConfig(endpoint="db:2379", ca_file=str(f.ca), cert_file=str(f.cert), key_file=str(f.key))
    a = etcd_access(None, "site.a", certs_dir=certs.path, etcd=ext)
    assert a.endpoint == "db:2379" and a.tls.cert == f.cert and a.tls.name == EXTERNAL_CLIENT
    assert a.server_name is None  # its own certificate: checked by the address dialled
    plain = etcd_access(None, "site.a", certs_dir=certs.path, etcd=EtcdConfig(endpoint="db:2379"))
    assert plain.tls is None and "without etcd.ca_file" in plain.reason
    with pytest.raises(ControlPlaneError, match="no client certificate"):
        etcd_access(None, "site.a", certs_dir=certs.path, etcd=EtcdConfig(endpoint="https://db:2379"))
    missing = EtcdConfig(endpoint="db:2379", ca_file=str(tmp_path / "nope.pem"), cert_file=str(f.cert),
                         key_file=str(f.key))
    with pytest.raises(Exception, match="nope.pem"):
        etcd_access(None, "site.a", certs_dir=certs.path, etcd=missing)


def test_a_missing_certificate_or_endpoint_is_named(certs):
    with pytest.raises(Exception, match="site.zz"):
        etcd_access("h:1", "site.zz", certs_dir=certs.path)
    with pytest.raises(ControlPlaneError, match="no etcd endpoint"):
        etcd_access(None, "site.a", certs_dir=certs.path, etcd=EtcdConfig())


@pytest.mark.parametrize("user, key, allowed", [
    ("coordinator", "/geotrain/r/coordinator_epoch", True),
    ("coordinator", "/geotrain/r/state", True),
    ("coordinator", "/geotrain/other/state", False),
    ("site.a", "/geotrain/r/members/a/0", True),
    ("site.a", "/geotrain/r/members/b/0", False),
    ("site.a", "/geotrain/r/members/ab/0", False),
    ("site.a", "/geotrain/r/coordinator_epoch", False),
    ("site.a", "/geotrain/r/state", False),
    ("launcher", "/geotrain/r/coordinator", False),
    ("etcd", "/geotrain/r/state", False),
    (None, "/geotrain/r/state", False),
])
def test_who_may_write_what(user, key, allowed):
    assert may_write(grants("r", ["a", "b", "ab"]), user, key) is allowed


def test_root_exists_and_is_no_part():
    g = grants("r", ["a"])
    assert [x.user for x in g if x.root] == ["root"]
    assert {x.user for x in g} == {"root", "coordinator", "launcher", "site.a"}
