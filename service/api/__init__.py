"""The HTTP layer: FastAPI app, routes, auth, and the one error→status mapping."""
