"""The benchmark rig: the gateway against B0, a plain forwarder, on loopback.

Every part is its own process, started and stopped by `bench.run` through its
`bench.rig.Rig`:

    redis-server      append-only, appendfsync everysec (the gateway's store)
    bench.standin     TikTok's Events API: a ledger per (pixel, event, event_id)
    bench.probe       `tiktok-gateway serve`, counting its Redis round trips
    bench.baseline    B0: validate, answer, batch to the stand-in from memory
    bench.load        the clients: closed loop (saturation) or constant arrival rate
    bench.memory      Redis bytes per remembered key, next to one SET per key
    bench.floor       in-process: validation and hashing per event (no I/O), a floor
    bench.cluster     a 3-primary Redis Cluster on loopback, for the scale-out phases

`bench.report` turns `bench/results/<date>.json` into docs/benchmarks.md and
its plot. `make bench` runs it all; `python -m bench.run --smoke` takes seconds.
"""
