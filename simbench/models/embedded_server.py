"""The embedded model's own process: llama.cpp's server (from the xllamacpp wheel) until told to stop.

    python -m simbench.models.embedded_server --model FILE.gguf --port N --alias local

simbench starts this with ``EmbeddedServer`` (simbench/models/embedded.py), never by hand. The server
runs on threads inside this process, so ending the process ends the server: on SIGTERM or SIGINT, and
when simbench goes away (the kernel's PR_SET_PDEATHSIG from the parent, and a watch on our parent's
pid in case the signal was not delivered).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

PARENT_POLL_SECONDS = 0.5


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simbench.models.embedded_server",
                                     description="Serve a GGUF model on 127.0.0.1 (OpenAI-compatible) until stopped.")
    parser.add_argument("--model", required=True, help="the .gguf file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", default="local", help="the model name requests use")
    parser.add_argument("--slots", type=int, default=4, help="requests decoded in parallel")
    parser.add_argument("--slot-tokens", type=int, default=2048, help="context of one slot")
    parser.add_argument("--threads", type=int, default=1, help="threads that generate tokens")
    parser.add_argument("--batch-threads", type=int, default=None,
                        help="threads that read prompts (default: --threads)")
    parser.add_argument("--poll", type=int, default=None,
                        help="how hard idle threads spin, 0-100 (llama.cpp's default: 50)")
    return parser.parse_args(argv)


def server_params(args: argparse.Namespace):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.slots
    params.n_ctx = args.slot_tokens * args.slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.batch_threads or args.threads
    if args.poll is not None:
        params.cpuparams.poll = params.cpuparams_batch.poll = args.poll
    params.ui = False
    return params


def wait_until_stopped(parent: int) -> None:
    """Block until SIGTERM/SIGINT arrives or the process that started us is gone."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(PARENT_POLL_SECONDS):
        if os.getppid() != parent:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    try:
        import xllamacpp
    except ImportError:
        print("xllamacpp is not installed: pip install 'simbench[local]'", file=sys.stderr)
        return 2
    try:
        server = xllamacpp.Server(server_params(args))
    except Exception as exc:  # the C++ side reports a bad model file or a taken port this way
        print(f"the embedded server did not start: {exc}", file=sys.stderr)
        return 1
    print(f"serving {args.model} as {args.alias!r} on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    wait_until_stopped(parent)
    del server  # joins the server's threads and frees the model
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stderr.flush()
    # Skip interpreter teardown: the extension's threads are gone and nothing is left to flush.
    os._exit(code)
