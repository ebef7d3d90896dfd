#!/bin/sh
# Resource r0 (/etc/mirrord/r0.toml) as a promotable clone, with pcs (0.11, Pacemaker
# 2.1).  Run on one node once the cluster is up; the same as r0-clone.xml and crm.txt.
# To review first, stage it in a file: pcs cluster cib r0.xml; pcs -f r0.xml ...;
# pcs cluster cib-push r0.xml --config
set -eu

# The primitive and its clone ("mirrord-r0-clone"): one instance per box, one primary, and
# notifications (the agent refreshes its promotion score on them).  The two monitors
# have different intervals: Pacemaker needs one recurring operation per role.
pcs resource create mirrord-r0 ocf:mirrord:mirrord \
    config=/etc/mirrord/r0.toml \
    op start interval=0s timeout=60s \
    op stop interval=0s timeout=60s \
    op promote interval=0s timeout=30s \
    op demote interval=0s timeout=30s \
    op notify interval=0s timeout=20s \
    op monitor interval=10s timeout=20s role=Promoted \
    op monitor interval=20s timeout=20s role=Unpromoted \
    promotable \
    promoted-max=1 promoted-node-max=1 clone-max=2 clone-node-max=1 notify=true

# What uses the volume (here a filesystem on an NBD client of the export, as an
# example) runs only where r0 is promoted, and only after the promotion:
#   pcs constraint colocation add fs-r0 with Promoted mirrord-r0-clone INFINITY
#   pcs constraint order promote mirrord-r0-clone then start fs-r0

# The first promotion of a fresh pair is an operator's decision (both disks start
# inconsistent and are never promoted by the cluster): with the clone in maintenance,
#   pcs resource meta mirrord-r0-clone maintenance=true
#   crm_resource --wait                                         # until the monitors are stopped
#   mirrorctl --config /etc/mirrord/r0.toml primary --force    # on the box whose data counts
#   mirrorctl --config /etc/mirrord/r0.toml status             # wait: both up-to-date
#   mirrorctl --config /etc/mirrord/r0.toml secondary
#   pcs resource meta mirrord-r0-clone maintenance=false
