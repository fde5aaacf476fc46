"""The diagnostics console at /console/: is deduplication working, and if not, why.

    views.py     what it shows, as plain types
    tally.py     the per-minute tallies each shard owner keeps and writes to Redis
    reading.py   reads the tallies and the /debug history back into views
    checks.py    the setup checks: a verdict, the finding, the fix, the evidence
    web.py       the routes, and the middleware every console answer goes through
    access.py    who may open it (token, session, bearer, open sandbox), CSRF, headers
    render.py    the templates (templates/), the chart, times and links
    actions.py   replaying dead letters, sending a test event
"""
