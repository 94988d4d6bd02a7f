"""How long summary.json + report.html take for a large run, and how big the report gets.

Builds a synthetic run file (default 10,000 sessions x 4 judges: 2 variants x 25 topics x
20 personas x 10 repeats) with realistic transcripts (6-12 messages of 50-150 words), written the
way a real run writes it: the matrix through ``parse_matrix``, samples, sessions and calls through
``RunStore``, and tutor spans in the local span exporter's row format (``simbench.tracing.local._row``:
OTel's flattened openinference attributes): each turn a ``tutor.turn`` root over its ChatCompletion
span (``input.value`` holding the whole request), about one turn in ten with a TOOL span, so the
report rebuilds every transcript from the trace store like it does after a real run. Then it times
the transcript rebuild, the summary and the report build and prints figures (no assertion on time):

    /work/venv/bin/python benchmarks/report_scale.py [--out DIR] [--keep] [--topics 25 --personas 20 --repeats 10]

``build_run(run_dir, ...)`` is also used by tests/test_report_browser.py for its large-run fixture.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from simbench.matrix import parse_matrix  # noqa: E402
from simbench.records import CallRecord, Judgement, Message, SimulatedSession, session_id_for  # noqa: E402
from simbench.store import RunStore, dumps  # noqa: E402
from simbench.tracing.setup import SESSION_END_SPAN, TOOL_CALL_MARK, TUTOR_TURN_SPAN  # noqa: E402

BOUND_S = 60.0
JUDGES = {  # name: (passing label, failing label); the built-in judges' labels
    "coherence": ("coherent", "incoherent"),
    "goal_completion": ("met", "not_met"),
    "frustration": ("not_frustrated", "frustrated"),
    "correctness": ("correct", "incorrect"),
}
VARIANTS = {"socratic": "You are a patient tutor teaching {{ topic.name }}. Ask guiding questions, give hints, never the answer.",
            "direct": "You are a tutor for {{ topic.name }}. Explain the solution clearly, step by step."}
MODEL = "bench-model"

_WORDS = (
    "the a to of and is it you that we this what if so can do not be have your with for on how when why "
    "denominator numerator fraction common add multiply divide equal half third sixth whole part number "
    "answer step try again think look first next then because means same different bigger smaller right "
    "wrong check example picture pizza slices share each both sum result write show work out problem "
    "question understand sure maybe really just still but ok great good yes no let us see makes sense "
    "rule method simplify convert equivalent lowest terms factor product quotient remainder decimal "
    "percent ratio compare order line mark point between over under across into from by as at or"
).split()
# A few replies carry markup, as model text sometimes does: it must stay text in the report.
_HOSTILE = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "</textarea>", "a < b && c > d"]


def _text(rng: random.Random, low: int = 50, high: int = 150) -> str:
    words = rng.choices(_WORDS, k=rng.randint(low, high))
    out, sentence = [], 0
    for w in words:
        sentence += 1
        out.append(w.capitalize() if sentence == 1 else w)
        if sentence > 6 and rng.random() < 0.15:
            out[-1] += rng.choice(".?.!")
            sentence = 0
    text = " ".join(out).rstrip(".?!") + "."
    if rng.random() < 0.01:
        text += " " + rng.choice(_HOSTILE)
    return text


def matrix_yaml(topics: int, personas: int, repeats: int, judges: list[str]) -> str:
    matrix = {
        "name": "scale-benchmark",
        "models": {"fake": {"base_url": "http://127.0.0.1:9/v1", "model": MODEL}},
        "tutor": {"model": "fake", "baseline": "socratic", "variants": VARIANTS},
        "student": {"model": "fake"},
        "judges": {"model": "fake", "use": judges},
        "topics": [{"name": f"topic {t:02d}", "opening": f"Question {t}: why isn't 1/2 + 1/3 equal to 2/5?",
                    "reference": "Use a common denominator: 3/6 + 2/6 = 5/6.",
                    "goal": "The student can add fractions with unlike denominators."} for t in range(topics)],
        "personas": [{"name": f"persona_{p:02d}", "description": f"Synthetic student number {p}."} for p in range(personas)],
        "repeats": repeats,
        "max_turns": 6,
    }
    return yaml.safe_dump(matrix, sort_keys=False)


def _span_row(rng: random.Random, session_id: str, persona: str, metadata: str, start: int, kind: str,
              attributes: dict, name: str, trace_id: str = "", parent_id: str | None = None) -> tuple:
    """One row as ``simbench.tracing.local._row`` writes it (a new trace unless ``trace_id`` is given)."""
    attributes = {"session.id": session_id, "user.id": persona, "metadata": metadata,
                  "openinference.span.kind": kind, **attributes}
    return (f"{rng.getrandbits(64):016x}", trace_id or f"{rng.getrandbits(128):032x}", parent_id,
            name, kind, start, start + 1_500_000_000, "OK", session_id, dumps(attributes))


def _turn_rows(rng: random.Random, session_id: str, persona: str, metadata: str, start: int, system: str,
               history: list[Message], reply: str) -> list[tuple]:
    """One tutor turn as a prompt tutor's run records it: the ``tutor.turn`` AGENT root (student
    message in, reply out, the chat request's messages), the ChatCompletion under it and, on about
    one turn in ten, a TOOL span of a tool call the agent returned."""
    llm = _llm_attributes(system, history, reply)
    turn_attributes = {k: v for k, v in llm.items() if k.startswith(("llm.input_messages.", "llm.output_messages."))}
    turn_attributes.update({"input.value": history[-1].content, "output.value": reply})
    turn = _span_row(rng, session_id, persona, metadata, start, "AGENT", turn_attributes, TUTOR_TURN_SPAN)
    rows = [turn, _span_row(rng, session_id, persona, metadata, start + 1000, "LLM", llm, "ChatCompletion",
                            turn[1], turn[0])]
    if rng.random() < 0.1:
        parameters = json.dumps({"expression": "1/2 + 1/3"})
        rows.append(_span_row(rng, session_id, persona, metadata, start + 2000, "TOOL",
                              {"tool.name": "calculator", "tool.parameters": parameters, "input.value": parameters,
                               "output.value": "5/6", TOOL_CALL_MARK: True}, "calculator", turn[1], turn[0]))
    return rows


def _llm_attributes(system: str, history: list[Message], reply: str) -> dict:
    roles = {"student": "user", "tutor": "assistant"}
    messages = [{"role": "system", "content": system}] + [{"role": roles[m.role], "content": m.content} for m in history]
    prompt = sum(len(m["content"].split()) for m in messages) * 4 // 3
    completion = len(reply.split()) * 4 // 3
    attributes: dict = {
        "input.mime_type": "application/json",
        "input.value": json.dumps({"model": MODEL, "messages": messages, "max_tokens": 256, "temperature": 0.7}),
        "llm.finish_reason": "stop",
        "llm.invocation_parameters": json.dumps({"model": MODEL, "max_tokens": 256, "temperature": 0.7}),
        "llm.model_name": MODEL,
        "llm.system": "openai",
        "llm.output_messages.0.message.content": reply,
        "llm.output_messages.0.message.role": "assistant",
        "llm.token_count.prompt": prompt,
        "llm.token_count.completion": completion,
        "llm.token_count.total": prompt + completion,
        "output.mime_type": "application/json",
        "output.value": json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "model": MODEL,
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": reply}}],
                                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}),
    }
    for i, m in enumerate(messages):
        attributes[f"llm.input_messages.{i}.message.role"] = m["role"]
        attributes[f"llm.input_messages.{i}.message.content"] = m["content"]
    return attributes


def _fail_probability(variant: str, persona_index: int, judge_index: int) -> float:
    """The direct variant fails less; some personas and judges are harder (so the heatmaps show structure)."""
    base = 0.35 if variant == "socratic" else 0.2
    return min(0.9, base + 0.02 * (persona_index % 7) + 0.05 * judge_index)


def build_run(run_dir: Path, topics: int = 25, personas: int = 20, repeats: int = 10, judges: int = 4,
              seed: int = 0) -> dict:
    """Write a finished synthetic run into ``run_dir`` (2 variants x topics x personas x repeats sessions)."""
    rng = random.Random(seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    judge_names = list(JUDGES)[:judges]
    source = run_dir / "matrix.yaml"
    source.write_text(matrix_yaml(topics, personas, repeats, judge_names), encoding="utf-8")
    matrix = parse_matrix(source.read_text(encoding="utf-8"), str(source))
    run_id = f"bench-{seed}"
    store = RunStore.open_run_dir(run_dir)
    try:
        store.create_run(run_id, matrix.name, matrix.source, matrix.fingerprint, matrix.model_dump_json(), "bench")
        samples = matrix.samples()
        store.add_samples(samples)
        persona_index = {p.name: i for i, p in enumerate(matrix.personas)}
        clock = 1_800_000_000 * 10**9
        spans: list[tuple] = []
        counts = {"sessions": 0, "spans": 0, "messages": 0, "words": 0, "judgements": 0}
        for sample in samples:
            topic = matrix.topic(sample.topic)
            session_id = session_id_for(run_id, sample.sample_id, 1)
            metadata = json.dumps({"variant": sample.variant, "topic": sample.topic, "persona": sample.persona,
                                   "repeat": sample.repeat, "sample_id": sample.sample_id, "attempt": 1})
            system = matrix.render_tutor_prompt(sample.variant, topic)
            errored = rng.random() < 0.005
            n_messages = rng.randint(6, 12) if not errored else rng.randint(1, 4)
            messages = [Message("student", topic.opening + " " + _text(rng, 20, 60))]
            while len(messages) < n_messages:
                role = "tutor" if messages[-1].role == "student" else "student"
                messages.append(Message(role, _text(rng)))
            session = SimulatedSession(sample, session_id, 1, "completed", list(messages),
                                       stop_reason="max_turns", started_at=clock / 1e9)
            if errored:
                session.status, session.stop_reason = "errored", "error"
                session.error = "APIStatusError: Error code: 500 - {'error': {'message': 'upstream <b>failed</b>'}}"
            calls: list[CallRecord] = []
            first_span = None
            for i, m in enumerate(messages):
                if m.role != "tutor":
                    continue
                clock += 2 * 10**9
                rows = _turn_rows(rng, session_id, sample.persona, metadata, clock, system, messages[:i], m.content)
                row = rows[1]  # the chat call, for its accounting
                first_span = first_span or rows[0][0]
                spans.extend(rows)
                calls.append(CallRecord("tutor", "fake", 200, False, round(rng.uniform(0.5, 3.0), 3),
                                        len(row[9]) // 5, len(m.content.split()) * 4 // 3))
                if i + 1 < len(messages):
                    calls.append(CallRecord("student", "fake", 200, False, round(rng.uniform(0.3, 1.5), 3),
                                            len(row[9]) // 5, len(messages[i + 1].content.split()) * 4 // 3))
            last = messages[-1]
            end_attrs = {"output.value": session.stop_reason}
            if last.role == "student" and session.tutor_turns:
                end_attrs["input.value"] = last.content
            clock += 10**9
            closing = _span_row(rng, session_id, sample.persona, metadata, clock, "CHAIN", end_attrs, SESSION_END_SPAN)
            spans.append(closing)
            session.ended_at = clock / 1e9
            store.start_session(session)
            store.finish_session(session, first_span or closing[0], calls)
            counts["sessions"] += 1
            counts["messages"] += len(messages)
            counts["words"] += sum(len(m.content.split()) for m in messages)
            if not errored:
                judgements, judge_calls = [], []
                for k, name in enumerate(judge_names):
                    good, bad = JUDGES[name]
                    draw = rng.random()
                    if draw < 0.01:
                        judgements.append(Judgement(session_id, name, MODEL, 0, "error",
                                                    error="TimeoutError: the judge did not answer in 60 s"))
                        continue
                    failed = draw < 0.01 + _fail_probability(sample.variant, persona_index[sample.persona], k)
                    judgements.append(Judgement(session_id, name, MODEL, 0, "ok", bad if failed else good,
                                                0.0 if failed else 1.0, not failed, _text(rng, 15, 45)))
                    judge_calls.append(CallRecord("judge", "fake", 200, False, round(rng.uniform(0.5, 2.0), 3),
                                                  counts["words"] % 997 + 600, 60))
                store.add_judgements(judgements, {session_id: judge_calls})
                counts["judgements"] += len(judgements)
            if len(spans) >= 2000:
                store.add_spans(spans)
                counts["spans"] += len(spans)
                spans = []
        store.add_spans(spans)
        counts["spans"] += len(spans)
        store.finish_run("finished")
    finally:
        store.close()
    return counts


def build_report(run_dir: Path) -> dict:
    """Time the summary and the report the way ``simbench report RUN_DIR`` builds them."""
    from simbench.evaluators.sessions import rebuild_sessions
    from simbench.reports.html import write_report
    from simbench.reports.summary import build_summary, write_summary
    from simbench.tracing.local import spans_dataframe

    store = RunStore.open_run_dir(run_dir)
    try:
        r0 = time.perf_counter()
        spans = spans_dataframe(store)
        r1 = time.perf_counter()
        transcripts = rebuild_sessions(spans)
        r2 = time.perf_counter()
        del spans, transcripts
        t0 = time.perf_counter()
        summary = build_summary(store)
        write_summary(summary, run_dir)
        t1 = time.perf_counter()
        path = write_report(store, summary, run_dir, embedded=False)
        t2 = time.perf_counter()
    finally:
        store.close()
    return {"spans_s": r1 - r0, "rebuild_s": r2 - r1, "summary_s": t1 - t0, "report_s": t2 - t1,
            "total_s": t2 - t0, "path": path}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="run directory (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--topics", type=int, default=25)
    parser.add_argument("--personas", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--judges", type=int, default=4, choices=range(1, len(JUDGES) + 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run_dir = args.out or Path(tempfile.mkdtemp(prefix="simbench-report-scale-"))
    if (run_dir / "run.sqlite").exists():
        print(f"reusing the run in {run_dir}")
        counts = None
    else:
        t0 = time.perf_counter()
        counts = build_run(run_dir, args.topics, args.personas, args.repeats, args.judges, args.seed)
        print(f"synthetic run: {counts['sessions']} sessions, {counts['judgements']} judgements, "
              f"{counts['spans']} spans, {counts['messages'] / counts['sessions']:.1f} messages and "
              f"{counts['words'] / counts['messages']:.0f} words per message on average; "
              f"run.sqlite {(run_dir / 'run.sqlite').stat().st_size / 1e6:.0f} MB; written in {time.perf_counter() - t0:.1f} s")
    try:
        r = build_report(run_dir)
        size = r["path"].stat().st_size / 1e6
        print(f"span dataframe from run.sqlite: {r['spans_s']:.2f} s; transcript rebuild: {r['rebuild_s']:.2f} s "
              "(both are also part of report.html)")
        print(f"summary.json: {r['summary_s']:.2f} s")
        print(f"report.html:  {r['report_s']:.2f} s")
        print(f"build seconds: {r['total_s']:.2f}")
        print(f"file size: {size:.1f} MB ({r['path']})")
        print(f"build time / {BOUND_S:.0f} s bound: {r['total_s'] / BOUND_S:.2f}")
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif counts is not None:
            print(f"run kept in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
