"""A fake of Lambda's Invoke API for the soak (bench/soak.py) and the container test
(scripts/container-test.sh): `POST /2015-03-31/functions/{name}/invocations` answered by mode.

Modes: `ok` (202), `throttle` (a share of requests answered 429 TooManyRequestsException),
`error` (a share answered 500 ServiceException), `slow` (each answer waits, then 202),
`missing` (404 ResourceNotFoundException: the bridge dead-letters the event). A mode is set for
all functions or for one. Signatures are not checked.

Every message of an accepted event is recorded by the key its payload carries (`{"k": ...}`,
or the payload itself when it is not such an object).

    fake_lambda.py --port 9000 --log accepted.txt   # standalone: one "function key" line per message
"""

import argparse
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/2015-03-31/functions/"
ERRORS = {
    "throttle": (429, "TooManyRequestsException", "Rate Exceeded."),
    "error": (500, "ServiceException", "Lambda is having a bad day"),
    "missing": (404, "ResourceNotFoundException", "Function not found"),
}


def message_key(message):
    """The key a message's payload carries, as text."""
    payload = message.get("payload")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return payload
    if isinstance(payload, dict) and "k" in payload:
        return str(payload["k"])
    return json.dumps(payload)


class FakeLambda:
    """The fake's state; `serve` starts it on 127.0.0.1 in a thread."""

    def __init__(self, log=None):
        self.lock = threading.Lock()
        self.mode = "ok"
        self.function_modes = {}
        self.refuse_share = 0.7
        self.slow_seconds = (1.0, 3.0)
        self.accepted = Counter()  # (function, key) -> times accepted
        self.answers = Counter()  # status -> requests
        self.log = log
        self.server = None

    def set_mode(self, mode, function=None):
        with self.lock:
            if function is None:
                self.mode = mode
            elif mode is None:
                self.function_modes.pop(function, None)
            else:
                self.function_modes[function] = mode

    def answer(self, function, body):
        """The status, headers and body for one request."""
        with self.lock:
            mode = self.function_modes.get(function, self.mode)
        if mode == "slow":
            time.sleep(random.uniform(*self.slow_seconds))
        refused = mode == "missing" or (mode in ERRORS and random.random() < self.refuse_share)
        if refused:
            status, code, message = ERRORS[mode]
            with self.lock:
                self.answers[status] += 1
            return status, {"x-amzn-errortype": code}, json.dumps({"message": message})
        try:
            messages = json.loads(body).get("messages", [])
        except ValueError:
            messages = []
        keys = [message_key(m) for m in messages]
        with self.lock:
            self.answers[202] += 1
            for key in keys:
                self.accepted[(function, key)] += 1
            if self.log is not None:
                self.log.write("".join(f"{function} {key}\n" for key in keys))
                self.log.flush()
        return 202, {}, ""

    def serve(self, port=0):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                if not path.startswith(PREFIX) or not path.endswith("/invocations"):
                    self.reply(404, {}, "")
                    return
                function = path[len(PREFIX) : -len("/invocations")]
                self.reply(*fake.answer(function, body))

            def reply(self, status, headers, text):
                data = text.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client gone mid-request (a killed bridge) is no news

        self.server = Server(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True, help="file to append 'function key' lines to")
    args = parser.parse_args()
    with open(args.log, "a", encoding="utf-8") as log:
        fake = FakeLambda(log)
        fake.serve(args.port)
        threading.Event().wait()


if __name__ == "__main__":
    main()
