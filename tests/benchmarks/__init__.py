"""
A benchmark of streamrelay against other layer-4 relays, on loopback.

Run it from the repository root with ``python -m tests.benchmarks`` (see
``__main__.py`` and ``--help``).  Not a test suite: pytest collects nothing
here, as no module is named ``test_*``.
"""
