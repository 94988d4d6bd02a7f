"""Throughput and scale of the run engine against a fake OpenAI-compatible server in its own process.

Prints figures; asserts nothing (these machines are shared and noisy). Each scenario runs the real
``simbench.run_matrix`` path (tracing on, local store, judges through phoenix.evals) in a fresh
child process, so its CPU time and peak RSS are its own.

    python benchmarks/engine.py                 # every scenario
    python benchmarks/engine.py sim64 judge64   # some of them
    python benchmarks/engine.py sim64 --sessions 100   # a quick smoke run of one scenario
    python benchmarks/engine.py sim64 --repeat 3       # three runs, to see the spread
    python benchmarks/engine.py sim64 --profile prof/  # py-spy profile of the harness process

Sessions have 3 tutor + 3 student calls (max_turns 3). Bounds: a session needs 6 sequential calls,
so simulation cannot beat ``concurrency / (6 x latency)`` sessions/s; judging cannot beat
``concurrency / latency`` judgements/s. Every role uses one model, whose limiter admits
``concurrency`` calls at once, so a whole run cannot beat ``concurrency / latency`` calls/s (the
``-own`` scenarios give the judges a model of their own, on the same server, with its own limiter).

A run judges each session as soon as it is committed (beside the simulation), so ``judge64``'s
judging overlaps its simulation; ``judge64-after`` simulates first (``judge=False``) and judges on
resume, so its judging phase stands alone (the judging figures and CPU per judge call).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from simbench.children import free_port

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_openai.py"

SCENARIOS = {
    "sim64": dict(sessions=1000, concurrency=64, latency=2.0, judges=False),
    "sim256": dict(sessions=1000, concurrency=256, latency=4.0, judges=False),
    "ceiling": dict(sessions=2000, concurrency=256, latency=0.05, judges=False),
    "judge64": dict(sessions=1000, concurrency=64, latency=2.0, judges=True),
    "judge64-after": dict(sessions=1000, concurrency=64, latency=2.0, judges=True, judge_after=True),
    "judge64-own": dict(sessions=1000, concurrency=64, latency=2.0, judges=True, judge_model="judge"),
    "judge64-own-after": dict(sessions=1000, concurrency=64, latency=2.0, judges=True, judge_model="judge",
                              judge_after=True),
    "cached": dict(sessions=1000, concurrency=64, latency=0.05, judges=True, rerun=True),
    "rss10k": dict(sessions=10000, concurrency=256, latency=0.2, judges=False),
}


def _matrix(base_url: str, sessions: int, concurrency: int, judge_model: str = "fake") -> str:
    personas = ["impatient", "terse", "anxious", "overconfident", "answer_seeker"]
    topics = ["adding_fractions", "photosynthesis", "python_loops", "solving_linear_equations"]
    repeats = -(-sessions // (len(personas) * len(topics)))
    return f"""
name: bench
models:
  fake: {{base_url: "{base_url}", model: fake, timeout: 120, concurrency: {concurrency}}}
  judge: {{base_url: "{base_url}", model: fake, timeout: 120, concurrency: {concurrency}}}
tutor: {{model: fake, variants: {{v: "You are a tutor for {{{{ topic.name }}}}."}}}}
student: {{model: fake}}
judges: {{model: {judge_model}}}
topics: {json.dumps(topics)}
personas: {json.dumps(personas)}
repeats: {repeats}
max_turns: 3
concurrency: {concurrency}
""", len(personas) * len(topics) * repeats


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuSampler(threading.Thread):
    """Samples (wall clock, process CPU) every 0.2 s, to tell the simulation phase's CPU from the rest."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append((time.time(), _cpu_s()))

    def cpu_between(self, start: float, end: float) -> float:
        inside = [cpu for t, cpu in self.samples if start <= t <= end]
        return inside[-1] - inside[0] if len(inside) > 1 else 0.0


def child(spec: dict) -> None:
    """Run one scenario in this process and print its figures as JSON."""
    sys.path.insert(0, str(ROOT))
    import httpx2

    from simbench import load_matrix, run_matrix
    from simbench.store import RunStore

    base_url = spec["base_url"]
    tmp = Path(spec["tmp"])
    matrix_text, planned = _matrix(base_url, spec["sessions"], spec["concurrency"], spec.get("judge_model", "fake"))
    (tmp / "m.yaml").write_text(matrix_text)
    matrix = load_matrix(tmp / "m.yaml")
    stats = lambda: httpx2.get(base_url.removesuffix("/v1") + "/_stats").json()["roles"]
    results = {}
    for label in (["first", "rerun"] if spec.get("rerun") else ["first"]):
        before = stats()
        sampler = CpuSampler()
        sampler.start()
        cpu0 = _cpu_s()
        t0 = time.perf_counter()
        cache = tmp / "cache.sqlite" if spec.get("rerun") else None
        if spec.get("judge_after"):
            run_matrix(matrix, tmp / label, cache_path=cache, progress=False, judge=False)
            run_matrix(matrix, tmp / label, cache_path=cache, progress=False, resume=True)
        else:
            run_matrix(matrix, tmp / label, cache_path=cache, progress=False, judge=spec["judges"])
        wall = time.perf_counter() - t0
        cpu1 = _cpu_s()
        sampler.stop.set()
        after = stats()
        calls = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
        store = RunStore.open_run_dir(tmp / label)
        sessions = store.latest_sessions()
        sim_start, sim_end = min(s["started_at"] for s in sessions), max(s["ended_at"] for s in sessions)
        sim_wall = sim_end - sim_start
        judge_times = [r["created_at"] for r in store._read("SELECT created_at FROM evaluations")]
        sim_calls = sum(1 for _ in store._read("SELECT 1 FROM calls WHERE role IN ('tutor','student')"))
        results[label] = {
            "wall_s": round(wall, 2),
            "sessions": len(sessions),
            "completed": sum(s["status"] == "completed" for s in sessions),
            "sim_wall_s": round(sim_wall, 2),
            "judgements": len(judge_times),
            "judge_wall_s": round(max(judge_times) - min(judge_times), 2) if judge_times else None,
            "judge_end_s": round(max(judge_times) - sim_start, 2) if judge_times else 0,
            "model_calls": calls,
            "sim_calls_accounted": sim_calls,
            "cpu_s": round(cpu1 - cpu0, 2),
            # The middle 80% of the simulation phase: CPU per call at steady load, without start-up and tail.
            "sim_cpu_s": round(sampler.cpu_between(sim_start + 0.1 * sim_wall, sim_end - 0.1 * sim_wall), 2),
            # Calls in that window: the tutor's LLM spans ending in it, each paired with one student call.
            "sim_window_calls": 2 * store._read(
                "SELECT COUNT(*) FROM spans WHERE span_kind = 'LLM' AND end_time BETWEEN ? AND ?",
                (int((sim_start + 0.1 * sim_wall) * 1e9), int((sim_end - 0.1 * sim_wall) * 1e9)))[0][0],
        }
        if len(judge_times) > 1:
            # The middle 80% of the judging phase: CPU per judge call (one per judgement) at steady load.
            j0, j1 = min(judge_times), max(judge_times)
            lo, hi = j0 + 0.1 * (j1 - j0), j1 - 0.1 * (j1 - j0)
            results[label]["judge_cpu_s"] = round(sampler.cpu_between(lo, hi), 2)
            results[label]["judge_window_calls"] = sum(lo <= t <= hi for t in judge_times)
        store.close()
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(results))


def run_scenario(name: str, sessions: int | None = None, profile: Path | None = None) -> dict:
    spec = dict(SCENARIOS[name])
    if sessions:
        spec["sessions"] = sessions
    prefix: list[str] = []
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        prefix = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "speedscope", "--rate", "200",
                  "-o", str(profile), "--"]
    return run_child(__file__, spec, spec["latency"], prefix)


def run_child(script: str, spec: dict, latency: float, prefix: list[str] = ()) -> dict:
    """Run ``script --child SPEC`` against a fresh fake server (``spec`` gains its ``base_url`` and a
    ``tmp`` directory) and return the figures the child prints as its last JSON line."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(FAKE), "--port", str(port), "--latency", str(latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # "fake openai server on ..."
        with tempfile.TemporaryDirectory() as tmp:
            spec = dict(spec, base_url=f"http://127.0.0.1:{port}/v1", tmp=tmp)
            out = subprocess.run([*prefix, sys.executable, script, "--child", json.dumps(spec)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            # The child's figures are its last JSON line (py-spy prints its own lines after it).
            return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    finally:
        server.terminate()
        server.wait()


def report(name: str, r: dict) -> None:
    spec = SCENARIOS[name]
    first = r["first"]
    c, lat = spec["concurrency"], spec["latency"]
    print(f"\n== {name}: {first['sessions']} sessions, concurrency {c}, latency {lat} s")
    print(f"   completed {first['completed']}/{first['sessions']}, wall {first['wall_s']} s, peak RSS {r['peak_rss_mb']} MB")
    sim_rate = first["sessions"] / first["sim_wall_s"]
    bound = c / (6 * lat)
    print(f"   simulation: {sim_rate:.2f} sessions/s; bound {bound:.2f}; ratio {sim_rate / bound:.2f}")
    calls = first["sim_calls_accounted"] + first["judgements"]
    if spec["judges"]:
        end = max(first["sim_wall_s"], first["judge_end_s"])
        shared = "" if spec.get("judge_model") else f"; bound {c / lat:.2f}; ratio {calls / end / (c / lat):.2f}"
        print(f"   whole run: {calls / end:.2f} calls/s from the first session to the last judgement "
              f"({end:.1f} s){shared}")
    print(f"   harness CPU: {1000 * first['cpu_s'] / max(1, calls):.2f} ms per model call, whole run "
          f"({first['cpu_s']} s / {calls} calls); {1000 * first['sim_cpu_s'] / max(1, first['sim_window_calls']):.2f} ms "
          f"at steady simulation load ({first['sim_cpu_s']} s / {first['sim_window_calls']} calls)")
    if spec["judges"] and first["judge_wall_s"]:
        jr = first["judgements"] / first["judge_wall_s"]
        print(f"   judging: {jr:.2f} judgements/s; bound {c / lat:.2f}; ratio {jr / (c / lat):.2f}")
        if first.get("judge_window_calls"):
            print(f"   harness CPU per judge call at steady judging load: "
                  f"{1000 * first['judge_cpu_s'] / first['judge_window_calls']:.2f} ms "
                  f"({first['judge_cpu_s']} s / {first['judge_window_calls']} calls)")
    if "rerun" in r:
        rr = r["rerun"]
        print(f"   cached re-run: wall {rr['wall_s']} s, model calls made {sum(rr['model_calls'].values())}, "
              f"sessions {rr['completed']}, judgements {rr['judgements']}")
    if name == "ceiling":
        print(f"   ceiling: {first['sim_calls_accounted'] / first['sim_wall_s']:.0f} calls/s")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="scenarios: " + ", ".join(f"{k} {v}" for k, v in SCENARIOS.items()))
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"which to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--sessions", type=int, help="override the session count (a quick smoke run)")
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this many times (to see the spread)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each run with py-spy into DIR/<scenario>-<n>.json (speedscope format)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    names = args.scenarios or list(SCENARIOS)
    print(f"simbench engine benchmark; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in names:
        for n in range(1, args.repeat + 1):
            profile = args.profile / f"{name}-{n}.json" if args.profile else None
            report(name, run_scenario(name, args.sessions, profile))


if __name__ == "__main__":
    main(sys.argv[1:])
