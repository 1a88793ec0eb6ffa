"""What the tests that start the pack's tools under torchrun share: a free rendezvous port (the test servers' own
``free_port``) and a child environment without the calling process's torchrun variables."""

from __future__ import annotations

import os

from comfy_server import free_port  # noqa: F401  (re-exported: one way to find a free port)


def torchrun_env() -> dict:
    """This process's environment for a torchrun child: no inherited rank / rendezvous variables, one OpenMP
    thread per process (the same float rounding at any process count), gloo on the loopback device."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "LOCAL_RANK",
                                                                   "WORLD_SIZE", "RANK", "GROUP_RANK"))}
    e.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return e
