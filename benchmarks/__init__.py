"""runstore's benchmarks: one script per comparison, run from the repository root.

``python -m benchmarks.bench_cycle``  the multi-process dispatcher cycle against the alternatives
``python -m benchmarks.bench_fresh``  a fresh process: open a store and prepare once; memory

``impls`` holds the implementations behind one small interface; ``pg_server`` re-exports the
throwaway PostgreSQL server of the tests (``tests/pg_server.py``).
"""
