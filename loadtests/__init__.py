"""Load tests and capacity planning (issue 14), a normal Locust project when it is built.

Built so far, pure and unit-tested (no Locust import, so they also serve the simulator):
`schedule` (open-loop arrivals and the generator's pacing error), `metrics` (TTFT, TPOT, ITL, E2E and
token counts of one streamed request), `traces` (the public Mooncake and Azure traces as requests),
`prompts` (block ids to text with equal tokens where the ids are equal),
`search` (the capacity search: grow the rate, then bisect, with repeated trials and Wilson intervals),
and `workload` (the YAML workload file, validated before any traffic). The Locust users, the report
and `make loadtest` do not exist yet.
"""
