"""The operator console at /console (routes.py); see docs/console.md."""
