"""Session rebuild from spans, built-in judges, running them."""
