"""Calibration: agreement statistics against hand-computed values and statsmodels, and
``simbench calibrate`` end to end on the fake judge server."""

from __future__ import annotations

import json

import pytest

from conftest import base_matrix, invoke
from fake_openai import judge_name
from simbench.reports.agreement import accuracy, cohen_kappa, confusion_matrix, fleiss_kappa

# statsmodels is a test extra (pyproject.toml): the reference values, never simbench's own code path.
from statsmodels.stats import inter_rater as statsmodels  # noqa: E402


# -- the statistics ------------------------------------------------------------------------------


def test_confusion_matrix_and_accuracy_by_hand():
    pairs = [("a", "a")] * 3 + [("a", "b")] * 2 + [("b", "b")] * 4 + [("b", "a")]
    table = confusion_matrix(pairs, ["a", "b"])
    assert table == [[3, 2], [1, 4]]  # rows: reference, columns: judged
    assert accuracy(table) == pytest.approx(0.7)
    assert accuracy([[0, 0], [0, 0]]) is None
    with pytest.raises(ValueError, match="'c'"):
        confusion_matrix([("a", "c")], ["a", "b"])


def test_cohen_kappa_by_hand():
    # p_o = 35/50 = 0.7; rows 0.5/0.5, columns 0.6/0.4; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    k = cohen_kappa([[20, 5], [10, 15]])
    assert k.kappa == pytest.approx(0.4)
    assert k.n == 50
    assert k.ci[0] < 0.4 < k.ci[1]
    assert cohen_kappa([[10, 0], [0, 10]]).kappa == pytest.approx(1.0)
    # No spread in the large-sample formula: no interval rather than a width-0 one.
    assert cohen_kappa([[10, 0], [0, 10]]).ci is None
    assert cohen_kappa([[1, 0], [1, 0]]).kappa == pytest.approx(0.0) and cohen_kappa([[1, 0], [1, 0]]).ci is None
    # Chance agreement 1 (one label throughout): undefined, not a number that looks like one.
    assert cohen_kappa([[7, 0], [0, 0]]).kappa is None
    assert cohen_kappa([[0, 0], [0, 0]]).kappa is None


@pytest.mark.parametrize("table", [
    [[20, 5], [10, 15]],
    [[45, 15], [25, 15]],
    [[14, 3, 1], [2, 20, 4], [0, 5, 11]],
    [[5, 1, 0, 2], [1, 8, 2, 0], [0, 1, 9, 1], [3, 0, 1, 6]],
])
def test_cohen_kappa_and_its_interval_match_statsmodels(table):
    ours = cohen_kappa(table)
    theirs = statsmodels.cohens_kappa(table)
    assert ours.kappa == pytest.approx(theirs.kappa)
    assert ours.se == pytest.approx(theirs.std_kappa)
    assert ours.ci[0] == pytest.approx(max(-1, theirs.kappa_low))
    assert ours.ci[1] == pytest.approx(min(1, theirs.kappa_upp))


FLEISS_1971 = [  # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories; kappa = 0.210
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


@pytest.mark.parametrize("counts", [FLEISS_1971, [[3, 0], [2, 1], [0, 3], [1, 2], [3, 0]], [[2, 1, 0], [0, 3, 0], [1, 1, 1]]])
def test_fleiss_kappa_matches_statsmodels(counts):
    assert fleiss_kappa(counts) == pytest.approx(statsmodels.fleiss_kappa(counts, method="fleiss"))


def test_fleiss_kappa_published_value_and_undefined_cases():
    assert fleiss_kappa(FLEISS_1971) == pytest.approx(0.20993, abs=1e-4)
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # one category throughout
    assert fleiss_kappa([[1, 0], [0, 1]]) is None  # one rating per subject
    assert fleiss_kappa([[2, 1], [1, 1]]) is None  # unequal ratings per subject
    assert fleiss_kappa([]) is None


# -- simbench calibrate ------------------------------------------------------------------------------

# Human labels of ten sessions on coherence (good/bad) and frustration (calm/annoyed), and what the
# fake judge answers for each. Coherence: agree on 8 of 10. Frustration: agree on 4 of 4 labelled.
HUMAN_COHERENCE = ["good"] * 5 + ["bad"] * 5
JUDGE_COHERENCE = ["coherent"] * 4 + ["incoherent"] + ["incoherent"] * 4 + ["coherent"]
HUMAN_FRUSTRATION = {0: "calm", 1: "annoyed", 2: "calm", 3: "annoyed"}
LABEL_MAP = "coherence:\n  good: coherent\n  bad: incoherent\nfrustration:\n  calm: not_frustrated\n  annoyed: frustrated\n"


def _line(i: int, **labels) -> str:
    return json.dumps({
        "session_id": f"conv-{i}",
        "messages": [{"role": "user", "content": "What is 1/2 + 1/3?"},
                     {"role": "assistant", "content": f"<<conv-{i}>> Let's find a common denominator."}],
        "metadata": {"topic": "fractions"},
        "labels": labels,
    })


def _labelled_file(tmp_path) -> str:
    lines = []
    for i in range(10):
        labels = {"coherence": HUMAN_COHERENCE[i]}
        if i in HUMAN_FRUSTRATION:
            labels["frustration"] = HUMAN_FRUSTRATION[i]
        lines.append(_line(i, **labels))
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _judge(prompt: str, labels: list[str]) -> str:
    i = int(prompt.split("<<conv-")[1].split(">>")[0])
    if judge_name(prompt) == "coherence":
        return JUDGE_COHERENCE[i]
    return {"calm": "not_frustrated", "annoyed": "frustrated"}[HUMAN_FRUSTRATION[i]]


def _setup(make_fake, write_matrix, tmp_path, **fake_kwargs):
    fake = make_fake(**({"judge_label": _judge} | fake_kwargs))
    matrix = base_matrix(fake.base_url)
    matrix["judges"]["use"] = ["coherence", "goal_completion", "frustration", "correctness"]
    (tmp_path / "map.yaml").write_text(LABEL_MAP, encoding="utf-8")
    return fake, write_matrix(matrix), str(tmp_path / "map.yaml")


def test_calibrate_end_to_end(make_fake, write_matrix, tmp_path, open_run):
    fake, matrix, label_map = _setup(make_fake, write_matrix, tmp_path)
    out = tmp_path / "cal"
    result = invoke("calibrate", _labelled_file(tmp_path), "--map", label_map, "--matrix", matrix,
                    "--out", out, "-q", "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output
    # Only the labelled dimensions are judged (goal_completion and correctness are in use, unlabelled).
    assert {judge_name(json.dumps(r)) for r in fake.requests_of("judge")} == {"coherence", "frustration"}

    cal = open_run(out).summary()["calibration"]
    coherence = cal["dimensions"]["coherence"]
    assert coherence["labels"] == ["coherent", "incoherent"]
    assert coherence["confusion"] == [[4, 1], [1, 4]]  # rows: human (mapped), columns: judge
    assert (coherence["labelled"], coherence["compared"], coherence["agreed"]) == (10, 10, 8)
    assert coherence["accuracy"] == pytest.approx(0.8)
    assert coherence["kappa"] == pytest.approx(0.6)  # p_o 0.8, p_e 0.5
    theirs = statsmodels.cohens_kappa([[4, 1], [1, 4]])
    assert coherence["kappa_ci"] == pytest.approx([max(-1, theirs.kappa_low), min(1, theirs.kappa_upp)])
    assert sorted((d["source_id"], d["human"], d["expected"], d["judge"]) for d in coherence["disagreements"]) == [
        ("conv-4", "good", "coherent", "incoherent"), ("conv-9", "bad", "incoherent", "coherent")]
    assert all(d["line"] == int(d["source_id"][-1]) + 1 for d in coherence["disagreements"])
    frustration = cal["dimensions"]["frustration"]
    assert (frustration["compared"], frustration["accuracy"], frustration["kappa"]) == (4, 1.0, 1.0)
    assert frustration["disagreements"] == []
    assert frustration["kappa_ci"] is None  # perfect agreement: no width-0 interval
    assert cal["map"]["coherence"] == {"good": "coherent", "bad": "incoherent"}

    assert "accuracy  80% (8/10)  kappa 0.60" in result.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="calibration"' in html and "conv-4" in html and "<bdi>good</bdi> (= <bdi>coherent</bdi>)" in html

    # The report rebuilt from the run file keeps the section.
    (out / "report.html").unlink()
    assert invoke("report", out).exit_code == 0
    assert 'id="calibration"' in (out / "report.html").read_text(encoding="utf-8")


def test_min_kappa_exits_1_when_a_dimension_is_under_it(make_fake, write_matrix, tmp_path):
    fake, matrix, label_map = _setup(make_fake, write_matrix, tmp_path)
    args = [_labelled_file(tmp_path), "--map", label_map, "--matrix", matrix, "-q", "--cache", tmp_path / "c.sqlite"]
    under = invoke("calibrate", *args, "--out", tmp_path / "a", "--min-kappa", "0.7")
    assert under.exit_code == 1, under.output
    assert "coherence: Cohen's kappa 0.60 is under --min-kappa 0.7" in under.output
    assert "frustration" not in under.output.split("calibration failed")[-1]
    over = invoke("calibrate", *args, "--out", tmp_path / "b", "--min-kappa", "0.5")
    assert over.exit_code == 0, over.output


def test_judge_errors_are_counted_apart_never_as_agreement(make_fake, write_matrix, tmp_path, open_run):
    fake, matrix, label_map = _setup(make_fake, write_matrix, tmp_path, judge_reply=lambda p, l: "no json")
    out = tmp_path / "cal"
    result = invoke("calibrate", _labelled_file(tmp_path), "--map", label_map, "--matrix", matrix,
                    "--out", out, "-q", "--no-cache", "--min-kappa", "0")
    assert result.exit_code == 1, result.output  # no verdict at all: kappa undefined, under any minimum
    coherence = open_run(out).summary()["calibration"]["dimensions"]["coherence"]
    assert coherence["compared"] == 0 and coherence["not_compared"]["error"] == 10
    assert coherence["accuracy"] is None and coherence["kappa"] is None
    assert len(coherence["no_verdict"]) == 10


def test_model_text_in_disagreements_is_escaped(make_fake, write_matrix, tmp_path):
    def reply(prompt, labels):
        return json.dumps({"explanation": "<script>alert(1)</script>", "label": labels[-1]})

    fake, matrix, label_map = _setup(make_fake, write_matrix, tmp_path, judge_reply=reply)
    out = tmp_path / "cal"
    result = invoke("calibrate", _labelled_file(tmp_path), "--map", label_map, "--matrix", matrix, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.parametrize("label_map, lines, expected", [
    (LABEL_MAP, [_line(0, coherence="meh")], "labelled.jsonl:1: labels.coherence: 'meh' is not in"),
    ("coherence:\n  good: coherentt\n", [_line(0, coherence="good")], "map.yaml: coherence.good: 'coherentt' is not a label"),
    (None, [_line(0, coherence="good")], "labelled.jsonl:1: labels.coherence: 'good' is not a label of the coherence judge"),
    (LABEL_MAP, [_line(0, helpfulness="good")], "labelled.jsonl:1: labels.helpfulness: no judge of that name is used"),
    (LABEL_MAP, [_line(0)], "no session has human labels"),
    ("correctness:\n  good: correct\n", [_line(0, coherence="good")], "map.yaml: correctness: no judge of that name is used"),
    ("coherence: [a, b]\n", [_line(0, coherence="good")], "map.yaml:1: coherence: expected a mapping"),
])
def test_label_problems_are_input_errors_before_any_model_call(fake, write_matrix, tmp_path, label_map, lines, expected):
    matrix = base_matrix(fake.base_url)
    matrix["judges"]["use"] = ["coherence", "frustration"]
    matrix = write_matrix(matrix)
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["calibrate", path, "--matrix", matrix, "-q", "--out", tmp_path / "cal"]
    if label_map is not None:
        (tmp_path / "map.yaml").write_text(label_map, encoding="utf-8")
        args += ["--map", tmp_path / "map.yaml"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert fake.chat_calls == 0
