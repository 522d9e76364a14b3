"""Tandem's serving layer: deployment spec, engines, Ray Serve deployments, OpenAI ingress, CLI."""
