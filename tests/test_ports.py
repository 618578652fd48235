"""The loopback ports the development tools hand out to the processes they start (which bind them later)."""

from __future__ import annotations

from devtools.controlplane import free_port


def test_a_port_handed_out_is_never_handed_out_again() -> None:
    # The kernel answers a bind to port 0 with any port free at that moment; one handed out earlier is
    # free until its process binds it, or while that process is stopped (the session's operator, paused
    # by a module, starts again on its port). Among the ~14,000 ports it uses for such binds here, 500
    # answers repeat one with a probability of 1 - 1e-4 (a repeat came within 94 picks).
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
