"""One processor per task kind, each split into request, reconcile and refresh."""
