"""The README's example (examples/tutor.yaml) on the embedded model: simulation, judging and total time.

Prints figures; asserts nothing (the machine is shared). Each configuration runs ``simbench run
examples/tutor.yaml --no-cache`` in a fresh child process with the embedded server's slots and threads
set to SLOTSxTHREADS[xBATCH_THREADS] (module constants of ``simbench.models.embedded``, which only this script changes):

    python benchmarks/embedded_example.py                  # 4x1x2 (the default on 2 cores)
    python benchmarks/embedded_example.py --config 4x1 --config 4x1x2   # 2 threads read prompts
    python benchmarks/embedded_example.py --tree /tmp/old                # another checkout's code

Figures, read from the run file: simulation = first session start to last session end; judging after
= last session end to last judgement (sessions are judged as they are committed, so most judging
happens during the simulation: "judged before" counts those judgements); total = run created to run
finished (start-up and report included); the wall time of the whole command (interpreter start,
imports, report); and the slot-seconds the server idled during the simulation for want of sessions
(``idle_slot_seconds``).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import sys
from simbench.models import embedded
embedded.SLOTS, embedded.THREADS, embedded.BATCH_THREADS = {slots}, {threads}, {batch}
from simbench.cli import main
sys.argv = ["simbench", "run", {matrix!r}, "--out", {out!r}, "--no-cache", "-q"]
main()
"""


def phases(run_file: Path, slots: int) -> dict[str, float]:
    with sqlite3.connect(run_file) as db:
        created, finished = db.execute("SELECT created_at, finished_at FROM runs").fetchone()
        first, last = db.execute("SELECT MIN(started_at), MAX(ended_at) FROM sessions").fetchone()
        judged = db.execute("SELECT MAX(created_at) FROM evaluations").fetchone()[0]
        early = db.execute("SELECT COUNT(*) FROM evaluations WHERE created_at < ?", (last,)).fetchone()[0]
        sessions = db.execute("SELECT COUNT(*) FROM sessions WHERE status = 'completed'").fetchone()[0]
        spans = db.execute("SELECT started_at, ended_at FROM sessions").fetchall()
        judgements = db.execute("SELECT COUNT(*) FROM evaluations WHERE error IS NULL").fetchone()[0]
    return {"simulation_s": last - first, "judging_s": judged - last, "total_s": finished - created, "early": early,
            "sessions": sessions, "judgements": judgements, "idle_slot_s": idle_slot_seconds(spans, slots)}


def idle_slot_seconds(sessions: list[tuple[float, float]], slots: int) -> float:
    """Slot-seconds the server had no session's call to serve during the simulation: each running
    session keeps one call in flight (its tutor and student calls are sequential), so with fewer than
    ``slots`` sessions running the rest of the slots idle. This bounds what judging sessions as they
    are committed (overlapping the two phases) could gain: at most idle / slots seconds."""
    events = sorted([(start, 1) for start, _ in sessions] + [(end, -1) for _, end in sessions])
    idle, running, now = 0.0, 0, events[0][0]
    for at, step in events:
        idle += max(0, slots - running) * (at - now)
        running, now = running + step, at
    return idle


def measure(config: str, matrix: Path, tree: Path = ROOT) -> dict:
    slots, threads, *batch = (int(part) for part in config.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        code = CHILD.format(slots=slots, threads=threads, batch=batch[0] if batch else threads, matrix=str(matrix), out=str(out))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode not in (0, 1):  # 1: a gate, which the example does not set; kept for custom matrices
            raise SystemExit(f"{config}: exit {result.returncode}\n{result.stderr[-2000:]}")
        return {"config": config, "wall_s": wall, **phases(out / "run.sqlite", slots)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="SLOTSxTHREADS[xBATCH_THREADS] (repeatable); default: 4x1x2")
    parser.add_argument("--matrix", type=Path, default=ROOT / "examples" / "tutor.yaml")
    parser.add_argument("--tree", type=Path, default=ROOT, help="run simbench from this checkout (default: this one)")
    args = parser.parse_args()
    print(f"{'slots x threads':>16} {'simulation s':>13} {'judging after s':>16} {'run s':>7} {'wall s':>7} "
          f"{'sessions':>9} {'judgements':>11} {'judged before':>14} {'idle slot-s':>12}")
    for config in args.config or ["4x1x2"]:
        row = measure(config, args.matrix.resolve(), args.tree.resolve())
        print(f"{row['config']:>16} {row['simulation_s']:>13.1f} {row['judging_s']:>16.1f} {row['total_s']:>7.1f} "
              f"{row['wall_s']:>7.1f} {row['sessions']:>9} {row['judgements']:>11} {row['early']:>14} "
              f"{row['idle_slot_s']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
