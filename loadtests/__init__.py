"""Load tests and capacity planning: a Locust project with token metrics, open-loop shapes, trace
replay, a capacity search and reports (see docs/loadtesting.md).

- `locustfile` (the Locust glue: `TandemUser`, `TandemShape`, records to the master),
  `users/` (one module per request type) and `client` (the shared streaming client) run under
  Locust, in their own processes;
- `run` (`python -m loadtests run | search | report`) starts them and never imports Locust or Ray;
- pure and unit-tested, also for the simulator: `workload` (the YAML file), `plan` (the open-loop
  arrivals and how workers share them), `schedule`, `metrics`, `traces`, `prompts`, `search`,
  `summary` (records to the JSON summary), `locust_events` and `report` (HTML and PNG plots).
"""
