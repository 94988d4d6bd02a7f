"""summary.json and report.html."""

# File names inside a run directory (kept here, light to import, so the CLI can name them).
COMPARE_FILE = "compare.html"
