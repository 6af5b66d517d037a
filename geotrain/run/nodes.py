"""How the nodes of a multi-node site agree on each start of the site's process group.

A site of ``nodes`` > 1 run by ``geotrain site NAME TOPOLOGY --node-rank K`` has one such process per
node (the node's agent), each starting its node's workers. The site's group meets at a c10d
``TCPStore`` that node 0's agent hosts on ``--master-addr:--master-port`` for as long as it lives
(torchrun's agent store, ``TORCHELASTIC_USE_AGENT_STORE``, does the same); the workers are its clients.
A group cannot take a new member, so a dead worker restarts every node's workers, and they must all
meet in the *same* start: each start has a key prefix ``<token>/<generation>`` (the workers'
``GEOTRAIN_RENDEZVOUS``), keys of an earlier start are never read again.

- node 0 makes the generations: ``generation`` is bumped at each start of its workers; ``token`` is
  random per life of node 0's agent (a restarted agent starts over at 1, under a new token);
- node K waits for a generation it has not started yet, then starts its workers in it;
- an agent whose worker died sets ``restart/<generation>``; every agent watches that key and stops
  its own workers when it appears (node 0 then bumps the generation, the others follow);
- a node whose workers all exited 0 sets ``done/<generation>/<K>``; node 0's agent keeps the store up
  until every node is done (or ``linger_s`` passed), so no worker loses the store at exit.

:func:`next_start` is the decision of the waiting nodes, a pure function of what the store says.
"""

from __future__ import annotations

import datetime
import time
import uuid


def next_start(token: str | None, generation: int, last: tuple[str, int] | None) -> tuple[str, int] | None:
    """The start node K should join now, given the store's ``token`` and ``generation`` and the start it
    joined last (None: none yet); None: wait (node 0 has not made a newer start)."""
    if token is None or generation < 1:
        return None
    if last is None or last[0] != token or generation > last[1]:
        return token, generation
    return None


class NodeRendezvous:
    """One node's side of the protocol above (``node_rank`` 0 hosts the store)."""

    def __init__(self, master_addr: str, master_port: int, node_rank: int, nodes: int, timeout_s: float = 600.0):
        from torch.distributed import TCPStore

        self.node_rank, self.nodes = node_rank, nodes
        self.store = TCPStore(master_addr, master_port, is_master=node_rank == 0, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        if node_rank == 0:
            self.store.set("token", uuid.uuid4().hex)
        self.current: tuple[str, int] | None = None

    def _get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def start(self, wait_s: float = 600.0, alive=lambda: True) -> str:
        """Join the next start of the site's group; returns its key prefix (the workers' GEOTRAIN_RENDEZVOUS)."""
        if self.node_rank == 0:
            self.current = (self._get("token"), int(self.store.add("generation", 1)))
        else:
            deadline = time.monotonic() + wait_s
            while True:
                found = next_start(self._get("token"), int(self.store.add("generation", 0)), self.current)
                if found is not None:
                    self.current = found
                    break
                if time.monotonic() > deadline or not alive():
                    raise TimeoutError(f"node 0 of the site made no new start within {wait_s:.0f}s")
                time.sleep(0.2)
        return f"{self.current[0]}/{self.current[1]}"

    def restart_wanted(self) -> bool:
        """Some node asked for a new start of the group (its worker died), or node 0 already made one."""
        token, gen = self.current
        if self.store.check([f"restart/{token}/{gen}"]):
            return True
        return self.node_rank != 0 and next_start(self._get("token"), int(self.store.add("generation", 0)),
                                                  self.current) is not None

    def request_restart(self) -> None:
        token, gen = self.current
        self.store.set(f"restart/{token}/{gen}", str(self.node_rank))

    def finish(self, linger_s: float = 60.0) -> None:
        """This node's workers are done; node 0 waits for the others' before its store goes."""
        token, gen = self.current
        self.store.set(f"done/{token}/{gen}/{self.node_rank}", "1")
        if self.node_rank != 0:
            return
        keys = [f"done/{token}/{gen}/{k}" for k in range(self.nodes)]
        deadline = time.monotonic() + linger_s
        while not self.store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.2)
