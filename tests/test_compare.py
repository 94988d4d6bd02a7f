"""``simbench compare``: two runs on the fake server, paired on the samples they share."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAI  # noqa: E402

import simbench.cli  # noqa: E402
from simbench.reports.compare import compare_runs  # noqa: E402

XSS = "<script>alert(1)</script><img src=x onerror=alert(2)></textarea>"


def invoke(*args):
    result = CliRunner().invoke(simbench.cli.cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def judge(prompt: str, labels: list[str]) -> str:
    return labels[0] if "GOOD-TUTOR" in prompt else labels[1]


def make_run(tmp: Path, name: str, variant: str, good: bool, repeats: int = 4) -> Path:
    """A one-variant run whose tutor is good or bad throughout (each run on its own fake server, no cache)."""
    mark = "GOOD-TUTOR" if good else "BAD-TUTOR"
    with FakeOpenAI(tutor=lambda request: f"{mark} says {XSS}", judge_label=judge) as fake:
        matrix = {
            "name": f"compare-{name}",
            "models": {"fake": {"base_url": fake.base_url, "model": "fake-model", "max_retries": 0, "timeout": 20}},
            "tutor": {"model": "fake", "variants": {variant: "You are a tutor for {{ topic.name }}."}},
            "student": {"model": "fake"},
            "judges": {"model": "fake", "use": ["coherence"]},
            "topics": [{"name": "adding fractions", "opening": "Why isn't 1/2 + 1/3 = 2/5?"}],
            "personas": ["impatient", "confused_novice", "overconfident"],
            "repeats": repeats,
            "max_turns": 1,
            "concurrency": 8,
        }
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(matrix, sort_keys=False), encoding="utf-8")
        result = invoke("run", path, "--out", tmp / name, "-q", "--no-cache")
        assert result.exit_code == 0, result.output
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    return {
        "before": make_run(tmp, "before", "socratic", good=False),
        "after": make_run(tmp, "after", "socratic", good=True),
        "renamed": make_run(tmp, "renamed", "direct", good=True),
        "shorter": make_run(tmp, "shorter", "socratic", good=True, repeats=2),
    }


def test_compare_says_the_second_run_is_better(runs):
    result = invoke("compare", runs["before"], runs["after"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^socratic / coherence: better: .*n = 12 pairs", result.output, re.M)
    # which run is which, before the figures: B's pass rate comes first
    assert result.output.startswith(f"B {runs['after']} against A {runs['before']} (each line: pass rate B vs A")
    assert re.search(r"^socratic / coherence: better: .*pass rate 100% vs 0%", result.output, re.M)
    report = runs["after"] / "compare.html"
    assert f"report: {report}" in result.output
    html = report.read_text(encoding="utf-8")
    assert 'class="verdict better">better<' in html
    # The drill-down shows each changed sample from both runs side by side; untrusted text stays text.
    assert "Samples that changed (12)" in html
    assert html.count('<article class="session"') == 24
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"<img\b", html) and "</textarea>" not in html and html.count("<script") == 1


def test_compare_the_other_way_round_is_worse(runs, tmp_path):
    out = tmp_path / "reports" / "back.html"
    result = invoke("compare", runs["after"], runs["before"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "socratic / coherence: worse:" in result.output
    assert out.is_file() and "worse in B: coherence" in out.read_text(encoding="utf-8")


def test_a_run_against_itself_shows_no_detectable_difference(runs, tmp_path):
    result = invoke("compare", runs["before"], runs["before"], "--out", tmp_path / "same.html")
    assert result.exit_code == 0, result.output
    assert "socratic / coherence: no detectable difference with n = 12 pairs" in result.output


def test_runs_without_a_shared_variant_pair_their_baselines(runs):
    comparison = compare_runs(runs["before"], runs["renamed"])
    r = comparison.result
    assert r["mode"] == "baselines"
    c = r["comparisons"]["socratic → direct"]["coherence"]
    assert (c["n"], c["b"], c["c"], c["verdict"]) == (12, 0, 12, "better")
    assert any("share no variant name" in note for note in r["notes"])
    json.dumps(r)  # the result is JSON-ready


def test_only_shared_samples_pair(runs):
    r = compare_runs(runs["before"], runs["shorter"]).result
    c = r["comparisons"]["socratic"]["coherence"]
    assert (c["n"], c["c"], c["unshared"]) == (6, 6, 6)  # repeats 1-2 of 4 are shared
    assert c["p"] == pytest.approx(2 * 0.5**6)
    assert c["verdict"] == "better"


def test_compare_refuses_a_directory_without_a_run(runs, tmp_path):
    result = invoke("compare", runs["before"], tmp_path / "nothing")
    assert result.exit_code == 2
    assert "not a run directory" in result.output
