"""JUnit XML for CI: one test case per variant x dimension, failing when a gate on it fails.

Reads the gate checks already in ``summary["gates"]`` (decided once, in ``gates.py``); a dimension
without a gate is a passing test case that reports its pass rate.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .gates import check_gates


def _rate_text(counts: dict[str, Any] | None) -> str:
    if not counts or not counts.get("judged"):
        return "nothing judged"
    lo, hi = counts["pass_ci"]
    return (f"pass rate {counts['pass_rate']:.2f} ({counts['pass']}/{counts['judged']} judged; "
            f"95% CI {lo:.2f}-{hi:.2f}); {counts['error']} error, {counts['skipped']} skipped")


def junit_xml(summary: dict[str, Any]) -> str:
    """The JUnit document for a run's summary (with its ``gates`` section, as ``simbench run`` writes it)."""
    gates = summary.get("gates") or {}
    thresholds = gates.get("thresholds") or {}
    checks = {(c["dimension"], c["variant"]): c for c in gates.get("checks") or
              [c.as_dict() for c in check_gates(summary, thresholds)]}
    dimensions = list(summary.get("dimensions") or {})
    dimensions += [d for d in thresholds if d not in dimensions]
    variants = list(summary.get("variants") or [])
    variants += [v for (_, v) in checks if v and v not in variants]
    suite_name = f"simbench.{summary.get('matrix') or 'run'}"

    suites = ET.Element("testsuites", name="simbench")
    suite = ET.SubElement(suites, "testsuite", name=suite_name)
    props = ET.SubElement(suite, "properties")
    for key in ("run_id", "matrix_source", "baseline", "summary_version"):
        ET.SubElement(props, "property", name=key, value=str(summary.get(key)))
    tests = failures = 0
    for variant in variants:
        for dim in dimensions:
            tests += 1
            case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{variant}", name=dim, time="0")
            counts = (summary.get("dimensions", {}).get(dim) or {}).get("by_variant", {}).get(variant)
            check = checks.get((dim, variant))
            out = _rate_text(counts)
            if check is None:
                out += "; no gate"
            elif check["passed"]:
                out += f"; gate {check['minimum']:.2f} passed"
            else:
                failures += 1
                failure = ET.SubElement(case, "failure", type="gate", message=check["message"])
                failure.text = f"{check['message']}\n{out}"
            ET.SubElement(case, "system-out").text = out
    for element in (suites, suite):
        element.set("tests", str(tests))
        element.set("failures", str(failures))
        element.set("errors", "0")
    suite.set("skipped", "0")
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(summary: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(junit_xml(summary), encoding="utf-8")
    return path
