"""The soak (issue 15): many workflows on a faulted simulated world while `serve` is SIGKILLed
again and again; `python -m tests.soak.run` (or `make soak`). Not under pytest's testpaths: the
smoke version in tests/chaos/test_soak_smoke.py runs the same code with small knobs."""
