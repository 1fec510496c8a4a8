"""Event store, event catalogue and relay: the only source of truth."""
