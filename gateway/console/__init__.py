"""The diagnostics console at /console/: is deduplication working, and if not, why.

    views.py     what it shows, as plain types
    tally.py     the per-minute tallies each shard owner keeps and writes to Redis
    reading.py   reads the tallies and the /debug history back into views
    web.py       the pages, their access control and their actions
"""
