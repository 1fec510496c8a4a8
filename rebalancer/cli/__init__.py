"""The `rebalancer` command line: one module per command group, `main()` in main.py."""

from rebalancer.cli.format import json_default, when
from rebalancer.cli.main import main
from rebalancer.cli.parser import build_parser

__all__ = ["build_parser", "json_default", "main", "when"]
