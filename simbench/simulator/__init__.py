"""Tutor and student agents, the turn loop, the concurrent runner."""
