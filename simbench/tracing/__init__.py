"""Tracer setup and the trace stores."""
