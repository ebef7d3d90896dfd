"""ha package: to be built (see issues)."""
