"""Harness CPU per tutor turn: a ``callable`` tutor against a ``prompt`` tutor on the same fake server.

Prints figures; asserts nothing (the machine is shared). Each scenario runs the real
``simbench.run_matrix`` path (tracing on, local store, no judges) in a fresh child process against
``tests/fake_openai.py`` in its own process, like ``engine.py``:

    python benchmarks/tutor_kinds.py                       # every scenario
    python benchmarks/tutor_kinds.py prompt callable-sync  # some of them
    python benchmarks/tutor_kinds.py --sessions 100 --repeat 3

Scenarios (the student is simbench's own in all of them: one student call per tutor turn):

- ``prompt``: simbench's own tutor, one model call per turn through simbench's client;
- ``callable-sync``: ``def reply()`` with its own ``openai.OpenAI`` client, one model call per turn
  (runs in simbench's worker thread; the call is traced under the turn by the global instrumentor);
- ``callable-async``: ``async def reply()`` with its own ``openai.AsyncOpenAI`` client, one call per turn;
- ``callable-none``: ``def reply()`` that makes no model call and returns one tool call: what the
  callable path itself costs (turn span, worker thread, TOOL span, reply record), with no tutor call;
- ``own-tutor``: ``examples/own_tutor``'s ``reply()``: two model calls and up to two tool calls per turn.

Figure: harness CPU (user + system, the harness process only) divided by tutor turns, where one
turn = the tutor's work plus the one student call that follows it. Whole run and "steady" (the middle
80% of the simulation phase, 0.2 s CPU sampler; turns counted from the turn spans that end in it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import ROOT, CpuSampler, _cpu_s, run_child  # noqa: E402

TURN_SPAN = "tutor.turn"

SCENARIOS = {
    "prompt": dict(kind="prompt", tutor_calls_per_turn=1),
    "callable-sync": dict(kind="callable", function="reply_sync", tutor_calls_per_turn=1),
    "callable-async": dict(kind="callable", function="reply_async", tutor_calls_per_turn=1),
    "callable-none": dict(kind="callable", function="reply_none", tutor_calls_per_turn=0),
    "own-tutor": dict(kind="callable", function="own_tutor", tutor_calls_per_turn=2),
}

# The callables, written next to the matrix as bench_tutor.py (importable from the matrix's folder).
BENCH_TUTOR = '''
import threading

import openai

_lock = threading.Lock()
_clients = {}


def _client(cls, model):
    with _lock:
        key = (cls, model.base_url)
        if key not in _clients:
            _clients[key] = cls(base_url=model.base_url, api_key=model.api_key, max_retries=0, timeout=120)
        return _clients[key]


def _request(messages, context):
    return dict(model=context.model.model, max_tokens=64,
                messages=[{"role": "system", "content": "You are a tutor for fractions."}, *messages])


def reply_sync(messages, context):
    response = _client(openai.OpenAI, context.model).chat.completions.create(**_request(messages, context))
    return response.choices[0].message.content


async def reply_async(messages, context):
    response = await _client(openai.AsyncOpenAI, context.model).chat.completions.create(**_request(messages, context))
    return response.choices[0].message.content


def reply_none(messages, context):
    return {"text": f"Tutor turn {context.turn}: what is 1/2 in sixths?",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "1/2 + 1/3"}, "result": "5/6"}]}
'''


def _matrix(tmp: Path, spec: dict) -> str:
    personas = ["impatient", "terse", "anxious", "overconfident", "answer_seeker"]
    topics = ["adding_fractions", "dividing_fractions", "percent_change", "solving_linear_equations"]
    repeats = -(-spec["sessions"] // (len(personas) * len(topics)))
    model = f'fake: {{base_url: "{spec["base_url"]}", model: fake, timeout: 120, concurrency: {spec["concurrency"]}}}'
    if spec["kind"] == "prompt":
        tutor = '{model: fake, max_tokens: 64, variants: {v: "You are a tutor for {{ topic.name }}."}}'
    else:
        if spec["function"] == "own_tutor":
            callable_ = "tutor:reply"
            (tmp / "tutor.py").write_text((ROOT / "examples" / "own_tutor" / "tutor.py").read_text())
            (tmp / "notes.md").write_text((ROOT / "examples" / "own_tutor" / "notes.md").read_text())
        else:
            callable_ = f"bench_tutor:{spec['function']}"
            (tmp / "bench_tutor.py").write_text(BENCH_TUTOR)
        tutor = (f'{{kind: callable, callable: "{callable_}", model: fake, max_tokens: 64, '
                 f'concurrency: {spec["concurrency"]}, variants: {{v: {{settings: {{top_k: 2, calculator: true}}}}}}}}')
    return f"""
name: bench-tutor-kinds
models:
  {model}
tutor: {tutor}
student: {{model: fake, max_tokens: 64}}
judges: {{model: fake}}
topics: {json.dumps(topics)}
personas: {json.dumps(personas)}
repeats: {repeats}
max_turns: {spec["max_turns"]}
concurrency: {spec["concurrency"]}
"""


def child(spec: dict) -> None:
    """Run one scenario in this process and print its figures as JSON."""
    sys.path.insert(0, str(ROOT))
    import httpx2

    from simbench import load_matrix, run_matrix
    from simbench.store import RunStore

    tmp = Path(spec["tmp"])
    (tmp / "m.yaml").write_text(_matrix(tmp, spec))
    matrix = load_matrix(tmp / "m.yaml")
    stats = lambda: httpx2.get(spec["base_url"].removesuffix("/v1") + "/_stats").json()["roles"]
    before = stats()
    sampler = CpuSampler()
    sampler.start()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    run_matrix(matrix, tmp / "run", progress=False, judge=False)
    wall = time.perf_counter() - t0
    cpu1 = _cpu_s()
    sampler.stop.set()
    after = stats()
    store = RunStore.open_run_dir(tmp / "run")
    sessions = store.latest_sessions()
    sim_start, sim_end = min(s["started_at"] for s in sessions), max(s["ended_at"] for s in sessions)
    sim_wall = sim_end - sim_start
    lo, hi = sim_start + 0.1 * sim_wall, sim_end - 0.1 * sim_wall
    turns = store._read("SELECT COUNT(*) FROM spans WHERE name = ?", (TURN_SPAN,))[0][0]
    window_turns = store._read("SELECT COUNT(*) FROM spans WHERE name = ? AND end_time BETWEEN ? AND ?",
                               (TURN_SPAN, int(lo * 1e9), int(hi * 1e9)))[0][0]
    print(json.dumps({
        "wall_s": round(wall, 2), "sim_wall_s": round(sim_wall, 2), "sessions": len(sessions),
        "completed": sum(s["status"] == "completed" for s in sessions),
        "turns": turns, "window_turns": window_turns,
        "model_calls": {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)},
        "cpu_s": round(cpu1 - cpu0, 3), "sim_cpu_s": round(sampler.cpu_between(lo, hi), 3),
    }))
    store.close()


def run_scenario(name: str, args: argparse.Namespace) -> dict:
    spec = dict(SCENARIOS[name], sessions=args.sessions, concurrency=args.concurrency, max_turns=args.max_turns)
    return run_child(__file__, spec, args.latency)


def report(name: str, r: dict, args: argparse.Namespace) -> dict:
    calls = r["model_calls"]
    per_turn = 1000 * r["cpu_s"] / max(1, r["turns"])
    steady = 1000 * r["sim_cpu_s"] / max(1, r["window_turns"])
    sessions_per_s = r["sessions"] / r["sim_wall_s"] if r["sim_wall_s"] else 0.0
    calls_per_turn = SCENARIOS[name]["tutor_calls_per_turn"]
    bound = args.concurrency / ((calls_per_turn + 1) * args.max_turns * args.latency)
    print(f"  {name:15} completed {r['completed']}/{r['sessions']}  turns {r['turns']}  "
          f"calls tutor {calls.get('tutor', 0)} student {calls.get('student', 0)}  "
          f"CPU/turn {per_turn:.2f} ms whole run, {steady:.2f} ms steady ({r['sim_cpu_s']} s / {r['window_turns']})  "
          f"{sessions_per_s:.2f} sessions/s (bound {bound:.2f}, ratio {sessions_per_s / bound:.2f})", flush=True)
    return {"whole": per_turn, "steady": steady}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.5, help="the fake server's latency per call (s)")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the scenarios, alternating them")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    names = args.scenarios or list(SCENARIOS)
    print(f"simbench tutor-kinds benchmark; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.sessions} sessions x "
          f"{args.max_turns} turns, concurrency {args.concurrency}, latency {args.latency} s")
    figures: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(1, args.repeat + 1):
        print(f"round {round_}")
        for name in names:
            figures[name].append(report(name, run_scenario(name, args), args))
    if args.repeat > 1:
        print("mean over rounds (ms CPU per turn, whole run; steady)")
        for name, rows in figures.items():
            print(f"  {name:15} {sum(r['whole'] for r in rows) / len(rows):.2f}; "
                  f"{sum(r['steady'] for r in rows) / len(rows):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
