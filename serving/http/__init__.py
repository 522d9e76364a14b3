"""The HTTP front of the ingress: the OpenAI API routes and SSE (`api`), one request pipeline for
every endpoint (`pipeline`: plan → admit → open), `/v1/responses` (`responses`), the wire protocol
(`protocol`), API keys (`auth`), the front door's tiers/admission/health (`gateway`), the Ray Serve
ingress deployment (`ingress`) and its metrics (`metrics`)."""
