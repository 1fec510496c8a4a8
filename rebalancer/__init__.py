"""Rebalancer: moves crypto assets between exchange accounts along configured workflows."""
