"""Endpoints per role, the response cache, the embedded llama-server."""
