"""The admin API: health, stats, lookup, invalidation, TTL and quotas over HTTP, behind bearer
tokens with roles, every admin action and every denial written to an audit log.

- ``auth.py``: tokens and roles (read, admin), from a file; constant-time checks.
- ``audit.py``: the JSON-lines audit log.
- ``service.py``: the operations on one engine's books and tiers (no HTTP).
- ``http.py``: the HTTP server (stdlib ``http.server``; JSON in, JSON out, nothing executed).
"""
