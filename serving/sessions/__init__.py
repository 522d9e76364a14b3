"""Background sessions (`/v1/responses`): the worker that owns a session until it ends (`worker`),
its Ray Serve deployment (`server`), the stored request (`request`), numbered events and response
objects (`events`), the durable stores (`store`: the protocol and SQLite; `store_redis`: Redis;
`stores.open_store`: the one a spec names) and completion webhooks (`webhooks`)."""
