"""Who this process is in a run, and what it was told: its :class:`SiteContext`.

``geotrain launch`` (or ``geotrain site``) starts every worker with two things, torchrun-style:

* its **identity** in the environment, the variables of :data:`ENV_VARS` (site, rank, addresses,
  the run directory, a resume round, a site leader's ring memberships): what differs from one
  process to the next, or from one start of a site to its restart;
* its **settings** in one document, ``GEOTRAIN_WORKER_CONFIG`` naming
  ``RUN_DIR/worker-config.<site>.json``: a :class:`~geotrain.config.components.WorkerConfig`
  derived from the topology (:func:`geotrain.config.derive.worker_config`), the same for every process.

Ring memberships stay in the environment: they hold the ports the launcher gave this leader's ring
peers and whether to build the rings at start, which differs between the first start of a site and a
restart; the document is a function of the topology alone.

**torchrun.** A worker started by ``torchrun`` (``python -m torch.distributed.run``) is a geotrain worker
as it stands: its rank and the site's size come from torchrun's ``RANK`` and ``WORLD_SIZE`` when the
geotrain names (``GEOTRAIN_SITE_RANK``, ``GEOTRAIN_SITE_WORKERS``) are unset; ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` say where it sits among the site's nodes; ``MASTER_ADDR`` and
``MASTER_PORT`` are the rendezvous. What names the site, the run and the coordinator is the site's
environment (:func:`geotrain.run.site.site_env`; ``geotrain site NAME TOPOLOGY --exec torchrun ...``
hands it to torchrun, ``--print-env`` prints it). A geotrain name and torchrun's that disagree are an error.

Precedence: an explicit :class:`SiteContext` (``init(context)``, ``DiLoCo(context=...)``) > the
environment and its document > the defaults below (a variable unset or empty is the default; with no
document, the settings are ``WorkerConfig()``'s). ``ctx.<setting>`` reads ``ctx.config.<setting>``.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from geotrain.config.components import WorkerConfig
from geotrain.errors import GeotrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteContext:
    """Who this process is in the run (``config``: what it was told; its fields read as ``ctx.<name>`` too)."""

    run: str
    site: str
    rank: int
    workers: int
    coordinator: str
    run_dir: Path | None = None
    etcd: str | None = None
    topology_path: str | None = None
    device: str = "cpu"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    resume_round: int | None = None
    rings: tuple = ()
    local_rank: int | None = None
    """Rank among this node's workers (torchrun's LOCAL_RANK); None: ``rank`` (a one-node site)."""
    local_workers: int | None = None
    """Workers on this node (LOCAL_WORLD_SIZE); None: ``workers`` (a one-node site)."""
    node_rank: int = 0
    """This node's place among the site's nodes (torchrun's GROUP_RANK)."""
    rendezvous: str | None = None
    """Key prefix of this start of a multi-node site's group in the store its node 0 agent hosts
    (geotrain.run.nodes); None: rank 0 hosts the store (or the site meets through a file)."""
    elastic_run_id: str | None = None
    """torchrun's TORCHELASTIC_RUN_ID: set when torchrun started this process."""
    config: WorkerConfig = field(default_factory=WorkerConfig)

    @property
    def part(self) -> str:
        """This worker's checkpoint part name."""
        return f"{self.site}.{self.rank}"

    @property
    def tls(self):
        """This site's certificate files (geotrain.security.pki.TlsFiles ``site.<name>``); None = plaintext."""
        if self.config.certs_dir is None:
            return None
        from geotrain.security.pki import CertDir, site_name

        return CertDir(Path(self.config.certs_dir)).files(site_name(self.site))

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def proc(self) -> str:
        return f"{self.site}/{self.rank}"

    @property
    def multi_node(self) -> bool:
        """The site's group spans more than this node (its processes are not all here)."""
        return self.local_workers is not None and self.local_workers < self.workers

    @property
    def device_index(self) -> int:
        """This worker's accelerator on its node: its local rank."""
        return self.rank if self.local_rank is None else self.local_rank

    @classmethod
    def from_env(cls, env=None) -> "SiteContext":
        """Identity from ``env`` (default os.environ), settings from the document it names."""
        env = os.environ if env is None else env
        missing = [v.name for v in _IDENTITY if v.required and not env.get(v.name)]
        if missing:
            raise GeotrainError(f"geotrain.init(): {', '.join(missing)} not set; run this script through "
                                f"`geotrain launch` (or set the variables yourself, see geotrain.sdk.ENV_VARS)")
        given = {}
        for v in _IDENTITY:
            text = env.get(v.name) or (env.get(v.alias) if v.alias else None)
            if v.alias and env.get(v.name) and env.get(v.alias) and env.get(v.name) != env.get(v.alias):
                raise GeotrainError(f"geotrain.init(): {v.name}={env.get(v.name)!r} but {v.alias}={env.get(v.alias)!r} "
                                    f"(torchrun's); set one of them, or the same value")
            if not text:
                if v.default is not None:
                    given[v.field] = v.default
                continue
            try:
                given[v.field] = v.parse(text)
            except ValueError as exc:  # json.JSONDecodeError included
                raise GeotrainError(f"geotrain.init(): {v.name}={text!r}: {exc}") from None
        path = env.get(CONFIG_VAR)
        ctx = cls(**given, config=WorkerConfig.read(path) if path else WorkerConfig())
        problem = ctx.problem()
        if problem:
            raise GeotrainError(f"geotrain.init(): {problem}")
        return ctx

    def problem(self) -> str | None:
        """Why these ranks cannot be one worker of a site (a rank past the site's size, ...), or None."""
        if self.workers < 1:
            return f"the site has {self.workers} workers (GEOTRAIN_SITE_WORKERS / WORLD_SIZE); at least 1"
        if not 0 <= self.rank < self.workers:
            return f"rank {self.rank} is outside the site's {self.workers} workers (GEOTRAIN_SITE_RANK / RANK)"
        if self.local_workers is not None and not 1 <= self.local_workers <= self.workers:
            return (f"LOCAL_WORLD_SIZE={self.local_workers} does not fit the site's {self.workers} workers "
                    f"(GEOTRAIN_SITE_WORKERS / WORLD_SIZE)")
        if self.local_rank is not None and not 0 <= self.local_rank < (self.local_workers or self.workers):
            return f"LOCAL_RANK={self.local_rank} is outside this node's {self.local_workers or self.workers} workers"
        return None

    def identity_env(self) -> dict[str, str]:
        """This context's identity as the variables :meth:`from_env` reads (unset fields are left out)."""
        out = {}
        for v in _IDENTITY:
            value = getattr(self, v.field)
            if value is not None and value != ():
                out[v.name] = v.format(value)
        return out


# The settings, readable as ctx.<name> (ctx.inner_steps is ctx.config.inner_steps): declared once, by WorkerConfig.
for _name, _info in WorkerConfig.model_fields.items():
    setattr(SiteContext, _name, property(lambda self, _n=_name: getattr(self.config, _n), doc=_info.description))


@dataclass(frozen=True)
class _Var:
    """One identity variable: the SiteContext field it fills, how to read and write it, what it means."""

    name: str
    field: str
    doc: str
    parse: Callable[[str], Any] = str
    format: Callable[[Any], str] = str
    required: bool = False
    default: Any = None
    """Used when the variable is unset or empty; None: the SiteContext field's own default."""
    alias: str | None = None
    """torchrun's name for the same thing, read when ``name`` is unset (both set: they must agree)."""


def _rings(text: str) -> tuple:
    rings = json.loads(text)
    if not isinstance(rings, list) or not all(isinstance(m, dict) for m in rings):
        raise ValueError("expected a JSON list of ring memberships (objects)")
    return tuple(rings)


_IDENTITY = (
    _Var("GEOTRAIN_RUN", "run", "run name (etcd key prefix); default geotrain", default="geotrain"),
    _Var("GEOTRAIN_RUN_DIR", "run_dir", "run directory; events go to its metrics.jsonl", Path),
    _Var("GEOTRAIN_SITE", "site", "this process's site", required=True),
    _Var("GEOTRAIN_SITE_RANK", "rank", "rank inside the site, over all its nodes (0 = leader); torchrun's RANK "
         "when unset; default 0", int, default=0, alias="RANK"),
    _Var("GEOTRAIN_SITE_WORKERS", "workers", "number of worker processes in the site, over all its nodes; "
         "torchrun's WORLD_SIZE when unset; default 1", int, default=1, alias="WORLD_SIZE"),
    _Var("LOCAL_RANK", "local_rank", "rank among this node's workers (torchrun's); default: the site rank", int),
    _Var("LOCAL_WORLD_SIZE", "local_workers", "workers on this node (torchrun's); default: all the site's", int),
    _Var("GROUP_RANK", "node_rank", "this node's rank among the site's nodes (torchrun's); default 0", int),
    _Var("GEOTRAIN_RENDEZVOUS", "rendezvous", "multi-node site started by `geotrain site --node-rank`: this start's "
         "key prefix in the store node 0's agent hosts at MASTER_ADDR:MASTER_PORT"),
    _Var("TORCHELASTIC_RUN_ID", "elastic_run_id", "set by torchrun: this worker was started by torchrun"),
    _Var("GEOTRAIN_COORDINATOR", "coordinator", "host:port of the coordinator as seen from this site (its WAN link)",
         required=True),
    _Var("GEOTRAIN_ETCD", "etcd", "etcd endpoint host:port (membership); optional"),
    _Var("GEOTRAIN_TOPOLOGY", "topology_path", "path of the run's validated topology (JSON); optional"),
    _Var("GEOTRAIN_DEVICE", "device", "cpu or cuda; default cpu"),
    _Var("MASTER_ADDR", "master_addr", "the site's process group rendezvous host; default 127.0.0.1"),
    _Var("MASTER_PORT", "master_port", "the site's process group rendezvous port; default 29500", int),
    _Var("GEOTRAIN_RESUME_ROUND", "resume_round", "resume exactly from this checkpoint round (geotrain resume)", int),
    _Var("GEOTRAIN_RINGS", "rings", "ring/hierarchical merges: JSON list of this site leader's ring memberships",
         _rings, lambda rings: json.dumps(list(rings))),
)
CONFIG_VAR = "GEOTRAIN_WORKER_CONFIG"

ENV_VARS = {v.name: v.doc for v in _IDENTITY} | {
    CONFIG_VAR: "path of this worker's settings, a WorkerConfig JSON document (RUN_DIR/worker-config.<site>.json)"}



_registration = None


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - the process is exiting; say so and go on
            log.warning("could not destroy the site's process group at exit: %s", exc)


def rendezvous_file(run_dir: Path | None, site: str, master_port: int) -> Path:
    """Where the workers of one start of a one-host site meet (a torch ``FileStore``): named by the site
    and the start's ``master_port`` (fresh for every start). The first worker's environment
    (geotrain.run.site.worker_env, before any worker of the start runs) removes one that a killed
    earlier start with the same port left behind; workers that exit cleanly remove it themselves."""
    import tempfile

    return Path(run_dir or tempfile.gettempdir()) / "rendezvous" / f"{site}-{master_port}.store"


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def interface_towards(host: str) -> str | None:
    """The name of this host's network interface that its route to ``host`` leaves through (None: unknown).
    gloo picks its interface from the hostname otherwise, which in a network namespace or on a host with
    several addresses is often the wrong one (or loopback)."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP: no packet is sent, the kernel only picks the route and source address
            local = s.getsockname()[0]
        if is_loopback(local):
            return "lo"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


def _init_method(ctx: SiteContext) -> str:
    """The process group's rendezvous. A one-host site (one node, ``master_addr`` on loopback) meets
    through a file in the run directory, and gloo (NCCL) is told to use the loopback interface: nothing
    a site's workers open listens beyond loopback (torch's TCPStore server, the ``tcp://`` rendezvous,
    listens on every interface). A site of several nodes, or one started by torchrun, meets at the
    c10d TCPStore on ``master_addr:master_port`` (``tcp://``, what ``env://`` reads from MASTER_ADDR and
    MASTER_PORT; node 0's rank 0 hosts it, or torchrun's agent does: TORCHELASTIC_USE_AGENT_STORE), and
    gloo uses the interface that leads to ``master_addr`` unless GLOO_SOCKET_IFNAME says otherwise."""
    if ctx.multi_node or ctx.elastic_run_id or ctx.rendezvous or not is_loopback(ctx.master_addr):
        ifname = interface_towards(ctx.master_addr)
        if ifname:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(var, ifname)
        return f"tcp://{ctx.master_addr}:{ctx.master_port}"
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, "lo")
    path = rendezvous_file(ctx.run_dir, ctx.site, ctx.master_port)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"file://{path}"


def _etcd_config(ctx: SiteContext):
    """The topology's etcd section (an external etcd's TLS files), from the topology this worker was given."""
    if not ctx.topology_path:
        return None
    from geotrain.config.topology import load_any

    return load_any(ctx.topology_path).etcd


def init(context: SiteContext | None = None) -> SiteContext:
    """Join this process to its site: the site's process group, and etcd membership (under a lease)."""
    global _registration
    import torch  # here, not at the top: the launcher imports this module to write the environment
    import torch.distributed as dist

    ctx = context or SiteContext.from_env()
    from geotrain.worker import crash

    crash.install(ctx)  # an uncaught exception leaves a worker_crashed event (the launcher's crash-loop rule)
    if ctx.workers > 1 and not dist.is_initialized():
        backend = "nccl" if ctx.device == "cuda" else "gloo"
        if ctx.device == "cuda":
            torch.cuda.set_device(ctx.device_index % torch.cuda.device_count())
        timeout = datetime.timedelta(minutes=10)
        init = _init_method(ctx)
        if ctx.rendezvous:  # node 0's agent hosts the store for every start; this start's keys are under its prefix
            store = dist.PrefixStore(ctx.rendezvous, dist.TCPStore(ctx.master_addr, ctx.master_port, is_master=False,
                                                                   timeout=timeout))
            dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.workers, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init, rank=ctx.rank, world_size=ctx.workers, timeout=timeout)
        # Left to interpreter teardown, gloo could abort a rank whose peer had already exited ("terminate
        # called without an active exception", seen once in ~40 runs): the launcher then took a finished
        # site for a dead one and restarted it.
        atexit.register(_destroy_process_group)
    if ctx.etcd and _registration is None:
        from geotrain.control.plane import ControlPlane
        from geotrain.security.pki import site_name

        # As the site's certificate (its etcd user may write members/<site>/ only), unless plaintext.
        cp = ControlPlane.for_part(ctx.etcd, ctx.run, site_name(ctx.site), certs_dir=ctx.config.certs_dir,
                                   etcd=_etcd_config(ctx))
        _registration = cp.register_member(ctx.site, ctx.rank, {"pid": os.getpid(), "device": ctx.device})
    return ctx
