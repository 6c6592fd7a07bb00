"""The reliability campaign behind `benchmarks/soak.py`: a mixed soak, a bad-input corpus, fault
cases, and the small requests timed beside each hostile one. Loopback only, bounded in count and time.

- workload.py: the soak's requests (routes, streaming, constraints, abandoned streams), varied by seed;
- client.py: one request sent and its answers counted (exactly one final answer, or it is lost);
- bad_inputs.py: the corpus of malformed and hostile requests, each with the status it should get;
- faults.py: kill -9 of each process, SIGTERM with requests in flight;
- server.py: a `loom serve` child, its pids, and their resident memory;
- report.py: the markdown tables.
"""
