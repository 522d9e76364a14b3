"""SLO autoscaling policies: not built yet (issue 16). The one scaling rule today is Ray Serve's
autoscaler with `target_ongoing_requests` = half of a pool's `max_ongoing_requests` (serving/app.py)."""
