"""Who may make which coordinator call (mTLS identity, issue #11), as one pure function.

On a TLS server every caller presented a certificate signed by the run's CA; its common name is who
it is (geotrain.security.pki: ``site.<name>``, ``coordinator``, ``launcher``). A site's name is taken
from its certificate, never from the request: a request that names another site than its caller's
certificate is refused, whatever it carries.

    call        who may make it
    Join        a site of the topology, as itself
    InitModel   a site of the topology, as itself (the run's starting point comes from a site)
    Merge       a site of the topology, as itself (the stream's header names that site)
    GetModel    a site that is a member of the run (it joined, or the round expects it), as itself
    Status      any part of the run (a site, the launcher, the coordinator, a CLI with the launcher's certificate)
    ReportLost  the launcher, for any site of the topology; a site (its supervisor), for itself only

On a plaintext server (security.tls: false) there is no identity: the name in the request is
believed, as before, and the run says it is unauthenticated (progress, summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from geotrain.security.pki import COORDINATOR, LAUNCHER, site_of

SITE_CALLS = frozenset({"Join", "InitModel", "Merge", "GetModel"})


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def authorize(call: str, caller: str | None, claimed_site: str | None, *, sites: frozenset[str] | tuple[str, ...],
              members: frozenset[str] = frozenset(), tls: bool = True) -> Verdict:
    """May ``caller`` (a certificate's common name; None on plaintext) make ``call`` for ``claimed_site``
    (the site the request or its stream header names; None for Status)?"""
    if not tls:
        return Verdict(True, "plaintext server: no identity to check")
    if caller is None:
        return Verdict(False, f"{call}: the caller presented no certificate")
    if call == "Status":
        if caller in (COORDINATOR, LAUNCHER) or site_of(caller) in sites:
            return Verdict(True, f"{caller} is a part of the run")
        return Verdict(False, f"Status: {caller!r} is not a part of this run")
    if call == "ReportLost":
        if caller == LAUNCHER and claimed_site in sites:
            return Verdict(True, f"the launcher reports site {claimed_site!r}")
        site = site_of(caller)
        if site is not None and site in sites and site == claimed_site:
            return Verdict(True, f"site {site!r} reports itself")
        return Verdict(False, f"ReportLost: {caller!r} may not report site {claimed_site!r} (only the launcher, "
                              f"or a site about itself)")
    if call not in SITE_CALLS:
        return Verdict(False, f"{call}: unknown call")
    site = site_of(caller)
    if site is None:
        return Verdict(False, f"{call}: only a site may call it; the caller's certificate is {caller!r}")
    if site not in sites:
        return Verdict(False, f"{call}: the caller's certificate is for site {site!r}, which is not in the topology")
    if claimed_site != site:
        return Verdict(False, f"{call}: the caller is site {site!r} (its certificate) but the request is for "
                              f"site {claimed_site!r}; a site may act only as itself")
    if call == "GetModel" and site not in members:
        return Verdict(False, f"GetModel: site {site!r} is not a member of the run (it has not joined)")
    return Verdict(True, f"{call} by site {site!r}, as itself")
