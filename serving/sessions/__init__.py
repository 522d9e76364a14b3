"""Background sessions (`/v1/responses`): the worker that owns a session until it ends (`worker`),
its Ray Serve deployment (`server`), the stored request (`request`), numbered events and response
objects (`events`), the durable stores (`store`: SQLite, `store_redis`: Redis) and completion
webhooks (`webhooks`)."""
