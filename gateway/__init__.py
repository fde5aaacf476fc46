"""TikTok Events Gateway: one merged, deduplicated event per real action, forwarded to TikTok.

Where to look: requests enter in `ingest.py` (the browser's in
`browser.py`), become events in `formats.py`,
are stored and merged atomically by `store/` (merge rules in `merge.py`),
and leave for TikTok from `forwarder.py` through `upstream.py`.
"""

__version__ = "0.1.0"
