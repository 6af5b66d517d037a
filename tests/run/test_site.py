"""``geotrain site``: each worker starts with its identity in the environment and the run's settings document."""

import json
import sys

from geotrain.config.derive import worker_config
from geotrain.config.topology import parse_topology
from geotrain.run.site import run_site

REPORT = """
import json, sys
from geotrain.worker.context import SiteContext
ctx = SiteContext.from_env()
out = {"rank": ctx.rank, "workers": ctx.workers, "coordinator": ctx.coordinator, "config": ctx.config.model_dump(mode="json")}
open(sys.argv[1] + f"/seen.{ctx.rank}.json", "w").write(json.dumps(out))
"""


def test_site_workers_read_their_document(tmp_path):
    topo = parse_topology({"name": "s", "sites": [{"name": "a", "workers": 2}],
                           "training": {"inner_steps": 7, "round_timeout_s": 500}, "security": {"tls": False}})
    run_dir = tmp_path / "run"
    code = run_site(topo, "a", run_dir, etcd="127.0.0.1:1", coordinator="127.0.0.1:2",
                    script=[sys.executable, "-c", REPORT, str(tmp_path)])
    assert code == 0
    want = json.loads(worker_config(topo, run_dir).model_dump_json())
    assert json.loads((run_dir / "worker-config.a.json").read_text()) == want
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen.{rank}.json").read_text())
        assert seen == {"rank": rank, "workers": 2, "coordinator": "127.0.0.1:2", "config": want}
        assert seen["config"]["inner_steps"] == 7 and seen["config"]["rpc_timeout_s"] == 1000.0


def test_a_site_without_its_certificate_says_so(tmp_path):
    import pytest

    from geotrain.errors import GeotrainError
    from geotrain.security.pki import init_certs

    topo = parse_topology({"name": "s", "sites": [{"name": "a", "workers": 1}]})
    with pytest.raises(GeotrainError, match="no ca.pem for 'site.a'.*geotrain certs init"):
        run_site(topo, "a", tmp_path / "run", etcd="127.0.0.1:1", coordinator="127.0.0.1:2", script=["true"])
    certs = init_certs(tmp_path / "certs", ["b"])  # another site's pair only
    with pytest.raises(GeotrainError, match="no site.a.pem"):
        run_site(topo, "a", tmp_path / "run", etcd="127.0.0.1:1", coordinator="127.0.0.1:2", script=["true"],
                 certs=certs.path)
