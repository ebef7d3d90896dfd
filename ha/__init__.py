"""ha: cluster integration (corosync bindings, the OCF agent's logic, fencing helpers).

Exported here are the corosync bindings: ``ha.cpg.ProcessGroup`` and
``ha.quorum.Quorum`` wrap libcpg/libquorum with ctypes; ``ha.errors`` holds
their one error hierarchy.  Importing this package loads no library: each is
loaded on first use, so a box without corosync can still import it and gets
:class:`CorosyncUnavailable` only when it asks for a cluster.  Nothing in ha/
imports the daemon (mirrord/), protocol/ or resync/.
"""

from .cpg import Member, Membership, ProcessGroup, Reason
from .errors import CorosyncError, CorosyncUnavailable
from .quorum import Quorum

__all__ = [
    "CorosyncError",
    "CorosyncUnavailable",
    "Member",
    "Membership",
    "ProcessGroup",
    "Quorum",
    "Reason",
]
