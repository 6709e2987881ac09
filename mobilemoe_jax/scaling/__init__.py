"""On-device scaling: exact accounting of configs (and, later, the loss law and search)."""
