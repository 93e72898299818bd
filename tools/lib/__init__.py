"""What tools/'s benchmarks are built from: ``measure`` is what they share (eviction, residency,
timed runs, the engine pass, the bench models, the page-reporting switch); each other module is
one benchmark's part (the methods and report of bench_warm.py, the simulated engine and memory
pressure of first_request.py and keep_bench.py, keep_bench's statistics and /proc readers,
first_request's llama.cpp trials).  tools/README.md lists them."""
