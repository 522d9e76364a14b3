"""Request routing (pure library, no Ray import in the core): cache-aware replica choice,
model tiers and admission control. Filled in by the router, tiers and admission work."""
