"""The cluster simulator and capacity planner: Tandem's own router, P/D decider and admission code
over modelled engines on a simulated clock (see loadtests/sim/cluster.py and docs/simulator.md)."""
