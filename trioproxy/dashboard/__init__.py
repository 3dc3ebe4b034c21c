"""The operator's dashboard, served by the proxy under ``/dashboard`` (docs/dashboard.md):
admins sign in with a password (``auth.py``, ``sessions.py``), and the pages show and change
what the management API offers, through that API (``api.py``, ``pages.py``)."""
