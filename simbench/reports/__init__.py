"""summary.json and report.html."""
