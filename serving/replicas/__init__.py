"""Engine replicas: the Ray Serve deployments of the colocated, prefill and decode roles
(`deployments`), the engines behind the `Engine` protocol (`engines`), GPU placement
(`placement`, `dp`) and stream batching at the source (`streaming`)."""
