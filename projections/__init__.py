"""Read models rebuilt from the event store."""
