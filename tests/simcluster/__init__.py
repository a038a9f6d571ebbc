"""The project's test cluster: N namespace "nodes" on this machine with real sshd (and dockerd).

    from tests.simcluster import SimCluster
    with SimCluster(name="t", nodes=3) as c:
        c.exec(1, "hostname")

See docs/SIM_CLUSTER.md. pytest fixtures live in tests/conftest.py (helpers in .testing).
"""

from .cluster import (
    NodeCommandError,
    SimCluster,
    SimClusterError,
    SimNode,
    default_state_root,
    list_states,
    missing_capability,
    teardown,
)
from .image import IMAGE_TAG, container_volumes

__all__ = [
    "IMAGE_TAG", "NodeCommandError", "SimCluster", "SimClusterError", "SimNode",
    "container_volumes", "default_state_root", "list_states", "missing_capability", "teardown",
]
