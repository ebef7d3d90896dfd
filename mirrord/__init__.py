"""mirrord: the daemon side — the replication link's I/O, and (later) the engine,
the NBD frontend, the control socket and the command-line entry points."""
