"""SLO autoscaling policies over pool signals (pure functions; a Ray Serve adapter)."""
