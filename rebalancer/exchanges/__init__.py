"""Exchange connectors behind one narrow port; only this package imports ccxt."""
