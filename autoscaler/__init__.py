"""SLO autoscaling, pure (no Ray): `signals` (what the replicas and the ingress report, with its age),
`meters` (the windows they keep), `policy` (Tandem's decision for all of a model's pools) and
`baselines` (Ray Serve's default rule, a Dynamo-style throughput planner, fixed) for comparison.
The Ray Serve adapter is serving/autoscaling.py; the simulator runs the same policies
(loadtests/sim/autoscale.py)."""
