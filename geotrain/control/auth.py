"""Who may write what in a run's etcd: users, roles and permissions (:func:`grants`, pure), and turning them on.

etcd 3.4 started with ``--client-cert-auth`` takes the common name of the client certificate as the
etcd user once auth is enabled ("Using TLS Common Name", etcd.io/docs/v3.4/op-guide/authentication);
no password or token is ever sent. Each part of a run has its certificate (geotrain.security.pki), so
each is a user with a role of its own name:

==================  ===========================================  ===================================================
user (certificate)  may write                                    because
``coordinator``     every key under ``/geotrain/<run>/``         it alone hands out epochs (``coordinator_epoch``),
                                                                 announces its address and publishes the run state
``site.<s>``        ``/geotrain/<run>/members/<s>/`` only        its workers register themselves, nothing else;
                                                                 it reads the coordinator's address
``launcher``        nothing                                      it reads the coordinator's key (the heartbeat check)
``root``            (the root role: required to enable auth)     no certificate ``root`` is ever issued and its
                                                                 random password is never stored: nobody is root
==================  ===========================================  ===================================================

Every role reads the whole run prefix. Any other certificate of the run's CA (``etcd``'s own, say) is
no user at all and is refused everything; a certificate of another CA, or none, fails the TLS handshake.

What etcd 3.4 does not check (measured, tests/security/test_etcd_tls.py): granting a lease and keeping
*any* lease alive need no permission, so a site could keep a frozen coordinator's lease alive; revoking
a lease needs write permission on every key attached to it, so a site cannot revoke the coordinator's.

:func:`enable_auth` applies the grants and enables auth once, idempotently: on an etcd whose auth is on
already (a restart, ``geotrain resume``) the first call is refused PERMISSION_DENIED, and it checks that
auth is enforced instead (the caller's own write is refused).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2
from pyetcd import utils as etcd_utils

from geotrain.control.etcd_client import ETCD_ERRORS, permission_denied, reason
from geotrain.errors import ControlPlaneError
from geotrain.security.pki import COORDINATOR, LAUNCHER, site_name

log = logging.getLogger(__name__)

ROOT_USER = "root"
ROOT_ROLE = "root"
PROBE_KEY = "auth-probe"


@dataclass(frozen=True)
class Grant:
    """One etcd user (= a certificate's common name) and its role's permissions: key prefixes it may read
    and prefixes it may read and write."""

    user: str
    read: tuple[str, ...]
    write: tuple[str, ...]
    reason: str
    root: bool = False


def run_prefix(run: str) -> str:
    return f"/geotrain/{run}/"


def grants(run: str, sites) -> tuple[Grant, ...]:
    """The users and permissions of a run of ``sites`` (the module docstring's table)."""
    base = run_prefix(run)
    out = [Grant(ROOT_USER, (), (), "required by etcd to enable auth; no certificate of that name exists", root=True),
           Grant(COORDINATOR, (), (base,), "hands out epochs, announces its address, publishes the run state"),
           Grant(LAUNCHER, (base,), (), "reads the coordinator's key")]
    for s in sites:
        out.append(Grant(site_name(s), (base,), (f"{base}members/{s}/",),
                         "its workers register their membership; it reads the coordinator's address"))
    return tuple(out)


def may_write(grants_: tuple[Grant, ...], user: str | None, key: str) -> bool:
    """Would etcd let ``user`` write ``key`` under these grants? (The table as a function, for tests and docs.)"""
    for g in grants_:
        if g.user == user:
            return g.root or any(key.startswith(p) for p in g.write)
    return False


class _Already(Exception):
    """Auth is on already: the setup call was refused for the caller."""


def _call(what: str, fn, request, timeout_s: float, exists_ok: bool = False):
    try:
        return fn(request, timeout_s)
    except grpc.RpcError as exc:
        if permission_denied(exc):
            raise _Already(what) from exc
        details = exc.details() if hasattr(exc, "details") else ""
        if exists_ok and exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "already exists" in (details or ""):
            return None
        raise ControlPlaneError(f"etcd auth setup: {what} failed: {reason(exc, timeout_s)}") from exc


def enable_auth(client, run: str, grants_: tuple[Grant, ...], timeout_s: float = 5.0) -> str:
    """Create every user and role of ``grants_`` and enable auth; returns ``"enabled"``, or ``"already enabled"``
    when it was on before (then auth is checked to be enforced). ``client``: a pyetcd client with TLS whose
    certificate is *not* the coordinator's (its refused write proves enforcement)."""
    stub = client.authstub
    try:
        for g in grants_:
            # A random password nobody keeps: users authenticate by certificate only.
            _call(f"add user {g.user}", stub.UserAdd,
                  etcdrpc.AuthUserAddRequest(name=g.user, password=secrets.token_hex(24)), timeout_s, exists_ok=True)
            if g.root:
                _call(f"grant {ROOT_ROLE} to {g.user}", stub.UserGrantRole,
                      etcdrpc.AuthUserGrantRoleRequest(user=g.user, role=ROOT_ROLE), timeout_s)
                continue
            _call(f"add role {g.user}", stub.RoleAdd, etcdrpc.AuthRoleAddRequest(name=g.user), timeout_s, exists_ok=True)
            for prefixes, kind in ((g.read, auth_pb2.Permission.READ), (g.write, auth_pb2.Permission.READWRITE)):
                for prefix in prefixes:
                    key = prefix.encode()
                    perm = auth_pb2.Permission(permType=kind, key=key, range_end=etcd_utils.prefix_range_end(key))
                    _call(f"grant {prefix} to role {g.user}", stub.RoleGrantPermission,
                          etcdrpc.AuthRoleGrantPermissionRequest(name=g.user, perm=perm), timeout_s)
            _call(f"grant role {g.user}", stub.UserGrantRole,
                  etcdrpc.AuthUserGrantRoleRequest(user=g.user, role=g.user), timeout_s)
        _call("enable auth", stub.AuthEnable, etcdrpc.AuthEnableRequest(), timeout_s)
        outcome = "enabled"
    except _Already:
        outcome = "already enabled"
    check_enforced(client, run, timeout_s)
    log.info("etcd auth %s (%d users)", outcome, len(grants_))
    return outcome


def check_enforced(client, run: str, timeout_s: float = 5.0) -> None:
    """Raise ControlPlaneError unless etcd refuses ``client``'s write of a key of the run (auth is on)."""
    key = run_prefix(run) + PROBE_KEY
    try:
        client.put(key, "probe")
    except ETCD_ERRORS as exc:
        if permission_denied(exc):
            return
        raise ControlPlaneError(f"etcd auth check: put {key} failed: {reason(exc, timeout_s)}") from exc
    try:
        client.delete(key)
    except ETCD_ERRORS:
        pass
    raise ControlPlaneError(f"etcd auth check: put {key} was allowed: auth is not enforced for this certificate")
