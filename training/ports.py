"""TCP ports for process-group rendezvous (``MASTER_PORT``) and the test clusters' daemons.

Ports come from ``RENDEZVOUS_PORTS`` (20000–32767), below Linux's default ephemeral range (32768–60999): a port
picked as free and bound a moment later by torchrun or a daemon cannot meanwhile be handed to an outgoing
connection of this machine (gloo, NCCL, HTTP clients open many), which a port the OS picks (``bind(0)``, from the
ephemeral range) can — an ``EADDRINUSE`` now and then on a loaded machine.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection

RENDEZVOUS_PORTS = range(20000, 32768)
_pick = random.SystemRandom()     # independent of any seeded global RNG: two processes must not pick alike


def free_port(host: str = "127.0.0.1", exclude: Collection[int] = ()) -> int:
    """A port of ``RENDEZVOUS_PORTS`` that nothing is bound to on ``host`` right now (random start, then upwards),
    not in ``exclude`` (ports picked for something that has not bound them yet)."""
    start = _pick.randrange(len(RENDEZVOUS_PORTS))
    for i in range(len(RENDEZVOUS_PORTS)):
        port = RENDEZVOUS_PORTS[(start + i) % len(RENDEZVOUS_PORTS)]
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {min(RENDEZVOUS_PORTS)}–{max(RENDEZVOUS_PORTS)} on {host}")
