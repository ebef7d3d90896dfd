"""resync package: to be built (see issues)."""
