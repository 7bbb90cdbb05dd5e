"""Context parallelism on several GPUs of one host: every rank runs each generation, each on its share of the tokens.

Layout: ranks.py (which rank this process is, its device, how it was launched), group.py (the store and the
process groups), sharding.py (the split of the text and image tokens, the gather of the output), ulysses.py (the
all-to-alls around our attention kernels), transformer.py (the transformer's forward on one shard), control.py (jobs
broadcast through the store, heartbeats, the watchdog), engines.py (rank 0's engine and the others'), launch.py
(FLUX_PARALLEL=N spawning, the follower's main). The optimization that puts it into the stack:
flux_kontext/optimizations/context_parallel.py. Design and measurements: docs/CONTEXT_PARALLEL.md.
"""
