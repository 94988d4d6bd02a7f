"""The embedded model server (xllamacpp): start-up time and completion tokens/s by slots and threads.

Prints figures; asserts nothing (the machine is shared). Each configuration starts the real
``EmbeddedServer`` (``python -m simbench.models.embedded_server``, SmolLM2-135M Q4_1), waits for
``/v1/models``, then sends ``--requests`` chat completions at once, each asking for ``--tokens`` tokens
(``ignore_eos``-free: a request may stop early; tokens are counted from the answers' ``usage``):

    python benchmarks/embedded_server.py                         # the default grid
    python benchmarks/embedded_server.py --config 4x1 --config 2x1 --repeat 3

A configuration is SLOTSxTHREADS[xBATCH_THREADS] (batch threads read prompts; default: THREADS). Figure: completion tokens / wall seconds from the first request sent
to the last answer (the issue's reference: 54.2 tokens/s for 4 slots, 1 thread, 8 requests of 128).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simbench.models.embedded import EmbeddedServer  # noqa: E402

PROMPT = "Explain step by step how to add 1/2 and 1/3, then give two more practice problems."
DEFAULT_GRID = ["1x1", "2x1", "4x1", "8x1", "4x2"]


async def _burst(base_url: str, requests: int, tokens: int) -> tuple[int, float]:
    body = {"model": "local", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0.7}
    async with httpx2.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(client.post(base_url + "/chat/completions", json=body)
                                         for _ in range(requests)))
        wall = time.perf_counter() - start
    for answer in answers:
        answer.raise_for_status()
    return sum(a.json()["usage"]["completion_tokens"] for a in answers), wall


def measure(config: str, requests: int, tokens: int, repeat: int) -> dict:
    slots, threads, *batch = (int(part) for part in config.split("x"))
    started = time.perf_counter()
    with EmbeddedServer("local", 2048, slots=slots, threads=threads, batch_threads=batch[0] if batch else threads) as server:
        startup = time.perf_counter() - started
        asyncio.run(_burst(server.base_url, 1, 8))  # warm-up: first-request allocations
        rates = []
        for _ in range(repeat):
            completion, wall = asyncio.run(_burst(server.base_url, requests, tokens))
            rates.append(completion / wall)
    return {"config": config, "startup_s": startup, "tokens_per_s": statistics.median(rates),
            "min": min(rates), "max": max(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="SLOTSxTHREADS (repeatable); default: " + " ".join(DEFAULT_GRID))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"{'slots x threads':>16} {'start-up s':>11} {'tokens/s':>9} {'(min-max)':>13} {'vs 54.2':>8}")
    for config in args.config or DEFAULT_GRID:
        row = measure(config, args.requests, args.tokens, args.repeat)
        print(f"{row['config']:>16} {row['startup_s']:>11.1f} {row['tokens_per_s']:>9.1f} "
              f"{row['min']:>6.1f}-{row['max']:<6.1f} {row['tokens_per_s'] / 54.2:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
