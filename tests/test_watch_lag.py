"""An operator whose watch runs seconds behind its own writes, as under a burst of thousands of PRs.

kopf acts on an event from before its own patch once it has waited `consistency_timeout` for the
patched version to come back; at kopf's default (5 s) such an event (the Ready status the handler
wrote before kopf recorded the spec as handled) looks like a new object, and the environment is
provisioned a second time. The watch here lags 8 s behind (devtools.lagproxy).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.controlplane import ControlPlane
from devtools.lagproxy import lagging
from devtools.support import Kubectl, Process, wait_for
from tests.conftest import operator_with
from tests.test_operator import make_env, unique, wait_phase
from tests.test_shards import provisioned

LAG = 8.0  # seconds: past kopf's default consistency timeout (5 s), within Ephemera's (60 s)


@pytest.fixture(scope="module")
def lagging_operator(
    operator: Process, control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    kubeconfig = tmp_path_factory.mktemp("lag") / "kubeconfig"
    with lagging(control_plane, LAG) as proxy:
        proxy.kubeconfig(kubeconfig)
        yield from operator_with(operator, {"KUBECONFIG": str(kubeconfig), "EPHEMERA_KUBECONFIG": str(kubeconfig)})


def test_a_watch_lagging_behind_the_operators_writes_provisions_once(
    lagging_operator: Process, kubectl: Kubectl, tmp_path: Path
) -> None:
    first = unique("lag")
    kubectl.apply(make_env(first, 301))
    wait_phase(kubectl, first, "Ready", timeout=90)
    # The watch is one ordered stream: once an object made after `first` was Ready has been handled,
    # the operator has received every event of `first` up to its Ready, the stale ones included; a
    # second sentinel gives a duplicate run started by them a whole lag more to finish and be counted.
    names = [first]
    for number, sentinel in ((302, unique("lag")), (303, unique("lag"))):
        kubectl.apply(make_env(sentinel, number))
        wait_phase(kubectl, sentinel, "Ready", timeout=90)
        names.append(sentinel)
    # Counted per object: the restarted operator also provisions whatever other tests' objects it finds
    # unhandled at its start (made while the session's operator was stopped, which had not yet got to
    # them all), and its total would count those too.
    wait_for(lambda: provisioned(lagging_operator, names).total() >= 3, timeout=30, what="three provisions logged")
    assert provisioned(lagging_operator, names) == dict.fromkeys(names, 1)  # more: one was provisioned twice
