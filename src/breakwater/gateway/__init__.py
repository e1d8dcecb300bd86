"""The stateless gateway: OpenAI API over HTTP/SSE and WebSocket (the app: ``gateway.app.build_app``).

Nothing is imported here: the CLI's commands that only read or write Redis (``breakwater models``,
``tenants``, ``dlq``) import a module of this package without the web app's stack."""
