"""Speed benchmarks of the DHM code (``python -m bench.run``); speed is never measured in tests.

Every benchmark is a function ``fn(args) -> dict`` registered in ``bench.run.BENCHMARKS``; the
shared helpers (timing, synthetic data, the torchvision reference pipeline, model configs) live
in ``bench.common``.
"""
