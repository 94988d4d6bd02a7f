"""Endpoints per role, the response cache, the embedded model server."""
