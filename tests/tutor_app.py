"""A tiny JSON tutor app for the http tutor tests: ``python tutor_app.py --port N --log FILE [--fault F]``.

POST / with {"question": ...} answers {"answer": ..., "tools": [...]}; GET / answers 200. Every
POST's headers and body go to ``--log`` (one JSON line each), and the process writes its pid
there first, so a test can check it was stopped. ``--fault``: ``500``, ``malformed`` (not JSON) or
``nomatch`` (JSON without "answer") or ``echo`` (a 500 whose body repeats the Authorization header,
as a careless proxy does) or ``slow`` (answers after 3 s) for every POST; ``401`` (the key refused)
for every request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--fault", default="")
    args = parser.parse_args()

    def log(record: dict) -> None:
        with open(args.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if args.fault == "401":
                return self._send(401, b'{"error": "bad key"}')
            self._send(200, b'{"ok": true}')

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
            log({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            if args.fault == "500":
                return self._send(500, b'{"error": "down"}')
            if args.fault == "slow":
                time.sleep(3)
            if args.fault == "echo":
                return self._send(500, json.dumps({"error": f"bad request with {self.headers.get('authorization')}"}).encode())
            if args.fault == "malformed":
                return self._send(200, b"<html>not json")
            if args.fault == "nomatch":
                return self._send(200, b'{"text": "the wrong key"}')
            question = body.get("question", "")
            answer = {"answer": f"[{body.get('style')}] You asked: {question[:40]}",
                      "tools": [{"name": "lookup", "arguments": {"q": question[:20]}, "result": "a note"}],
                      "usage": {"prompt_tokens": 7, "completion_tokens": 5}}
            self._send(200, json.dumps(answer).encode())

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    log({"pid": os.getpid()})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
