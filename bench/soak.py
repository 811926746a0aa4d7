"""The soak: hours of mixed traffic through the release binary while everything around it fails.

Run by bench/soak.sh, which documents the scenario and the figures it prints. One driver does it
all: a mosquitto (with persistence) on a free port, the fake Invoke API of bench/fake_lambda.py
in this process, publishers with paho-mqtt, the bridge, a schedule of disturbances, and a sampler
that writes one CSV row every 10 s. Exits 1 when a message is lost or memory or descriptors grow
beyond the thresholds.
"""

import argparse
import csv
import getpass
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_lambda import FakeLambda  # noqa: E402

RULES = 10
PUBLISHERS = 5
SAMPLE_EVERY = 10.0
# The Lambda's moods, in turn: (mode, seconds).
LAMBDA_CYCLE = [("ok", 20), ("throttle", 15), ("ok", 20), ("error", 15), ("ok", 20), ("slow", 15)]
EXTRA_RULE = "extra"
METRICS = {
    "received": "mlb_messages_received_total",
    "delivered": "mlb_messages_delivered_total",
    "dropped": "mlb_messages_dropped_total",
    "dead_letters": "mlb_dead_letters_total",
    "buffer_messages": "mlb_buffer_messages",
    "metric_buffer_bytes": "mlb_buffer_bytes",
    "connected": "mlb_mqtt_connected",
}
INVOCATION_RESULTS = ("ok", "throttled", "error", "dead_lettered")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise SystemExit(f"soak: gave up after {timeout:.0f}s waiting for {what}")


class Broker:
    """mosquitto with persistence, so a restart keeps the sessions and their queued messages."""

    def __init__(self, work, port):
        self.port = port
        self.conf = work / "mosquitto.conf"
        self.db = work / "mosquitto" / "mosquitto.db"
        self.db.parent.mkdir()
        # `user`: started as root, mosquitto would switch to the user `mosquitto`, which cannot
        # write the database here, and every restart would lose the sessions.
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
            f"persistence true\npersistence_location {self.db.parent}/\nautosave_interval 0\n"
            "max_queued_messages 0\nmax_inflight_messages 100\n"
        )
        self.log = open(work / "mosquitto.log", "ab")
        self.proc = None
        self.restarts = 0

    def start(self):
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=self.log, stderr=self.log
        )
        wait_for(self.accepts, 10, f"mosquitto on port {self.port}")

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        if not self.db.exists():
            raise SystemExit(f"soak: mosquitto saved no database at {self.db} (see mosquitto.log): "
                             "a restart would lose the sessions")

    def restart(self, down_for):
        self.stop()
        time.sleep(down_for)
        self.start()
        self.restarts += 1


class Bridge:
    """The daemon under test, its configuration file and its process."""

    def __init__(self, binary, work, broker_port, lambda_port, metrics_port):
        self.binary = binary
        self.config = work / "config.toml"
        self.buffer = work / "buffer"
        self.metrics_port = metrics_port
        self.log = open(work / "bridge.log", "ab")
        self.head = (
            'shutdown_timeout = "8s"\n'
            f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\nclient_id = "soak"\n'
            f'[aws]\nregion = "us-east-1"\nendpoint_url = "http://127.0.0.1:{lambda_port}"\n'
            'operation_timeout = "10s"\n'
            f'[buffer]\ndir = "{self.buffer}"\nsegment_size = "256KiB"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        )
        self.proc = None
        self.starts = 0
        self.write_config(extra=False)

    def write_config(self, extra):
        rules = []
        for i in range(RULES):
            rule = f'[[rules]]\nname = "r{i}"\ntopic = "soak/r{i}/+"\nfunction = "f{i}"\n'
            rule += f"qos = {2 if i % 2 else 1}\n"
            if i % 3 == 0:
                rule += '[rules.batch]\nmax_messages = 20\nmax_wait = "1s"\n'
            if i == 4:
                rule += "max_concurrency = 1\n"
            rules.append(rule)
        if extra:
            rules.append(
                f'[[rules]]\nname = "{EXTRA_RULE}"\ntopic = "soak/{EXTRA_RULE}/+"\n'
                f'function = "{EXTRA_RULE}"\n'
            )
        text = self.head + "".join(rules)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def env(self):
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID="soak",
            AWS_SECRET_ACCESS_KEY="soak",
            AWS_EC2_METADATA_DISABLED="true",
            RUST_LOG="info",
        )
        return env

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=self.log,
            env=self.env(),
        )
        self.starts += 1
        wait_for(lambda: self.scrape().get("connected", 0) == 1, 30, "the bridge to connect")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        if code != 0:
            raise SystemExit(f"soak: the bridge exited {code} on SIGTERM (see bridge.log)")

    def reload(self, extra):
        self.write_config(extra)
        self.proc.send_signal(signal.SIGHUP)

    def replay_dead_letters(self):
        """`buffer dead-letters replay` needs the buffer to itself: stop, replay, start."""
        self.stop()
        run = subprocess.run(
            [self.binary, "buffer", "dead-letters", "replay", "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env(),
        )
        said = " ".join((run.stdout + run.stderr).split())
        log(f"dead-letters replay exited {run.returncode}: {said}")
        self.start()
        return run.returncode, said

    def scrape(self):
        """The metrics this soak follows, summed over their labels; {} when none answer."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        values = Counter()
        for line in text.splitlines():
            match = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if not match:
                continue
            name, labels, value = match.groups()
            for key, family in METRICS.items():
                if name == family:
                    values[key] += float(value)
            if name == "mlb_invocations_total":
                result = re.search(r'result="([a-z_]+)"', labels or "")
                if result:
                    values[f"invocations_{result.group(1)}"] += float(value)
        return values


class Publisher:
    """One MQTT client publishing numbered messages at a fixed rate, QoS 0, 1, 2 in turn."""

    def __init__(self, index, port, rate, stop):
        self.index = index
        self.rate = rate
        self.stop = stop
        self.sent = []  # (key, qos, rule, MQTTMessageInfo or None for QoS 0)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-pub{index}", clean_session=False
        )
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        rng = random.Random(self.index)
        n = 0
        start = time.monotonic()
        while not self.stop.is_set():
            qos = n % 3
            # One message in twenty goes to the rule that reloads add and remove.
            rule = EXTRA_RULE if rng.random() < 0.05 else f"r{rng.randrange(RULES)}"
            key = f"{self.index}-{n}"
            payload = json.dumps({"k": key, "q": qos, "v": rng.random(), "pad": "x" * rng.randrange(150)})
            info = self.client.publish(f"soak/{rule}/dev{self.index}", payload, qos=qos)
            if qos > 0:
                self.sent.append((key, qos, rule, info))
            elif info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.sent.append((key, qos, rule, None))
            n += 1
            pause = start + n / self.rate - time.monotonic()
            if pause > 0:
                self.stop.wait(pause)

    def acknowledged(self):
        return [s for s in self.sent if s[1] == 0 or acked(s[3])]

    def unacknowledged(self):
        return sum(1 for s in self.sent if s[1] > 0 and not acked(s[3]))


def acked(info):
    """Whether the broker acknowledged a QoS 1/2 publish. `is_published()` raises for one
    published while disconnected, which paho sends (and then acknowledges) after reconnecting."""
    with info._condition:
        return info._published


def process_sample(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def directory_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Sampler:
    COLUMNS = [
        "t_s", "pid", "rss_kib", "fds", "threads", "buffer_dir_bytes", "published",
        "accepted", "lambda_mode", "received", "delivered", "dropped", "dead_letters",
        "buffer_messages", "metric_buffer_bytes", "connected",
        *[f"invocations_{r}" for r in INVOCATION_RESULTS],
    ]

    def __init__(self, path, bridge, fake, publishers, start):
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, self.COLUMNS)
        self.csv.writeheader()
        self.bridge, self.fake, self.publishers, self.start = bridge, fake, publishers, start
        self.rows = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(SAMPLE_EVERY - (time.monotonic() - self.start) % SAMPLE_EVERY):
            self.sample()

    def sample(self):
        proc = self.bridge.proc
        try:
            row = process_sample(proc.pid)
        except (OSError, KeyError):
            return  # between a stop and a start
        metrics = self.bridge.scrape()
        with self.fake.lock:
            accepted = sum(self.fake.accepted.values())
            mode = self.fake.mode
        row.update(
            t_s=round(time.monotonic() - self.start, 1),
            pid=proc.pid,
            buffer_dir_bytes=directory_bytes(self.bridge.buffer),
            published=sum(len(p.sent) for p in self.publishers),
            accepted=accepted,
            lambda_mode=mode,
        )
        for key in self.COLUMNS:
            if key not in row:
                row[key] = int(metrics.get(key, 0))
        self.rows.append(row)
        self.csv.writerow(row)
        self.file.flush()


def slope_per_hour(points):
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 3600


def schedule(duration):
    """The disturbances, as (second, action, argument), in time order."""
    broker_every = min(240.0, max(30.0, duration / 5))
    reload_every = min(180.0, max(25.0, duration / 6))
    events = [(t, "broker", None) for t in frange(broker_every, duration - 20, broker_every)]
    extra = False
    for t in frange(reload_every / 2, duration - 20, reload_every):
        extra = not extra
        events.append((t, "reload", extra))
    # Dead letters for one rule early on, replayed once before the second half starts.
    dead_from = max(10.0, duration * 0.08)
    events += [(dead_from, "missing", "f9"), (dead_from + 10, "missing", None)]
    events.append((duration * 0.3, "replay", None))
    cycle_t = 0.0
    while cycle_t < duration:
        for mode, seconds in LAMBDA_CYCLE:
            events.append((cycle_t, "lambda", mode))
            cycle_t += seconds
    return sorted(events, key=lambda e: e[0])


def frange(start, stop, step):
    t = start
    while t < stop:
        yield t
        t += step


def disturb(action, argument, broker, bridge, fake, notes):
    if action == "broker":
        broker.restart(down_for=2)
    elif action == "reload":
        bridge.reload(extra=argument)
    elif action == "lambda":
        fake.set_mode(argument)
    elif action == "missing":
        fake.set_mode("missing" if argument else None, function="f9")
    elif action == "replay":
        notes["replay"] = bridge.replay_dead_letters()


def tally(publishers, fake):
    """Published, delivered, lost and duplicated, by the keys the fake recorded."""
    with fake.lock:
        accepted = dict(fake.accepted)
    by_key = Counter()
    for (function, key), times in accepted.items():
        by_key[(function, key)] += times
    figures = Counter()
    lost_examples = []
    for p in publishers:
        for key, qos, rule, _ in p.acknowledged():
            function = EXTRA_RULE if rule == EXTRA_RULE else f"f{rule[1:]}"
            times = by_key.get((function, key), 0)
            group = "extra" if rule == EXTRA_RULE else f"qos{qos}"
            figures[f"{group}_published"] += 1
            if times:
                figures[f"{group}_delivered"] += 1
                figures[f"{group}_duplicates"] += times - 1
            elif group != "extra":
                figures[f"{group}_lost"] += 1
                if qos > 0 and len(lost_examples) < 10:
                    lost_examples.append(f"{key} (QoS {qos}, rule {rule})")
        figures["unacknowledged"] += p.unacknowledged()
    return figures, lost_examples


def drain(publishers, fake, bridge, timeout):
    """Waits until every acknowledged QoS 1/2 message reached its function and the buffer is empty."""
    fake.set_mode("ok")
    fake.set_mode(None, function="f9")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        figures, _ = tally(publishers, fake)
        lost = figures["qos1_lost"] + figures["qos2_lost"]
        if lost == 0 and bridge.scrape().get("buffer_messages", 1) == 0:
            return True
        time.sleep(1)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, required=True, help="seconds of traffic")
    parser.add_argument("--bin", required=True, help="the bridge binary")
    parser.add_argument("--out", required=True, help="directory for the CSV, logs and chart")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second, in all")
    parser.add_argument("--max-rss-growth-mib", type=float, default=1.0)
    parser.add_argument("--max-fd-growth", type=int, default=0)
    args = parser.parse_args()

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    broker = Broker(work, free_port())
    broker.start()
    fake = FakeLambda()
    lambda_port = fake.serve()
    bridge = Bridge(args.bin, work, broker.port, lambda_port, free_port())
    bridge.start()
    log(f"broker on {broker.port}, fake Lambda on {lambda_port}, bridge pid {bridge.proc.pid}")

    stop = threading.Event()
    publishers = [Publisher(i, broker.port, args.rate / PUBLISHERS, stop) for i in range(PUBLISHERS)]
    start = time.monotonic()
    sampler = Sampler(work / "soak.csv", bridge, fake, publishers, start)
    for p in publishers:
        p.thread.start()
    sampler.thread.start()

    notes = {}
    marks = []
    try:
        for at, action, argument in schedule(args.duration):
            pause = start + at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if action != "lambda":
                log(f"{action} {argument if argument is not None else ''}".strip())
                marks.append((round(time.monotonic() - start, 1), action))
            disturb(action, argument, broker, bridge, fake, notes)
        time.sleep(max(0.0, start + args.duration - time.monotonic()))
        stop.set()
        log("publishing stopped; waiting for the publishers' acknowledgements and the drain")
        wait_for(lambda: all(p.unacknowledged() == 0 for p in publishers), 60, "PUBACKs")
        drained = drain(publishers, fake, bridge, timeout=180)
        sampler.sample()
    finally:
        sampler.stop.set()
        for p in publishers:
            p.client.loop_stop()
        bridge.stop()
        broker.stop()

    (work / "marks.json").write_text(json.dumps(marks))
    return report(args, work, publishers, fake, bridge, broker, sampler.rows, notes, drained)


def report(args, work, publishers, fake, bridge, broker, rows, notes, drained):
    figures, lost_examples = tally(publishers, fake)
    last_pid = rows[-1]["pid"]
    half = [r for r in rows if r["t_s"] >= args.duration / 2 and r["pid"] == last_pid and r["t_s"] <= args.duration]
    rss_slope = slope_per_hour([(r["t_s"], r["rss_kib"] / 1024) for r in half])
    fd_slope = slope_per_hour([(r["t_s"], r["fds"]) for r in half])
    span_h = (half[-1]["t_s"] - half[0]["t_s"]) / 3600 if len(half) > 1 else 0
    rss = [r["rss_kib"] / 1024 for r in half]
    # Descriptors come and go with Lambda connections: a leak raises the floor.
    quarter = [r["fds"] for r in half if r["t_s"] >= args.duration * 0.75]
    third = [r["fds"] for r in half if r["t_s"] < args.duration * 0.75]
    fd_floor_growth = (min(quarter) - min(third)) if quarter and third else 0
    lost = figures["qos1_lost"] + figures["qos2_lost"]
    summary = {
        "duration_s": args.duration,
        "published_qos1_2": figures["qos1_published"] + figures["qos2_published"],
        "delivered_unique_qos1_2": figures["qos1_delivered"] + figures["qos2_delivered"],
        "lost_qos1_2": lost,
        "duplicates_qos1_2": figures["qos1_duplicates"] + figures["qos2_duplicates"],
        "published_qos0": figures["qos0_published"],
        "delivered_qos0": figures["qos0_delivered"],
        "lost_qos0": figures["qos0_lost"],
        "extra_rule_published": figures["extra_published"],
        "extra_rule_delivered": figures["extra_delivered"],
        "broker_restarts": broker.restarts,
        "bridge_starts": bridge.starts,
        "replay": notes.get("replay"),
        "drained": drained,
        "rss_mib_second_half": [round(min(rss), 2), round(max(rss), 2)] if rss else None,
        "rss_slope_mib_per_h": round(rss_slope, 3),
        "rss_growth_second_half_mib": round(rss_slope * span_h, 3),
        "fd_slope_per_h": round(fd_slope, 2),
        "fd_floor_growth": fd_floor_growth,
        "fds_second_half": [min(r["fds"] for r in half), max(r["fds"] for r in half)] if half else None,
        "threads_second_half": [min(r["threads"] for r in half), max(r["threads"] for r in half)] if half else None,
        "lambda_answers": dict(fake.answers),
        "lost_examples": lost_examples,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"published (QoS 1/2, acknowledged by the broker): {summary['published_qos1_2']}")
    print(f"delivered unique (QoS 1/2): {summary['delivered_unique_qos1_2']}")
    print(f"lost (QoS 1/2): {lost}{'  e.g. ' + ', '.join(lost_examples) if lost_examples else ''}")
    print(f"duplicates (QoS 1/2): {summary['duplicates_qos1_2']}")
    print(f"QoS 0: published {figures['qos0_published']}, delivered {figures['qos0_delivered']}, "
          f"lost {figures['qos0_lost']} (allowed: QoS 0 across broker restarts)")
    print(f"reloaded rule: published {figures['extra_published']}, delivered {figures['extra_delivered']} "
          "(not counted as lost: the rule is absent half the time)")
    print(f"broker restarts {broker.restarts}, bridge starts {bridge.starts}, replay {notes.get('replay')}")
    if summary["rss_mib_second_half"]:
        print(f"second half: RSS {summary['rss_mib_second_half'][0]}-{summary['rss_mib_second_half'][1]} MiB, "
              f"slope {summary['rss_slope_mib_per_h']} MiB/h ({summary['rss_growth_second_half_mib']} MiB over it); "
              f"fds {summary['fds_second_half'][0]}-{summary['fds_second_half'][1]}, slope {summary['fd_slope_per_h']}/h, "
              f"floor growth {fd_floor_growth}; threads {summary['threads_second_half'][0]}-{summary['threads_second_half'][1]}")
    failures = []
    if lost:
        failures.append(f"{lost} acknowledged QoS 1/2 message(s) never reached their function")
    if not drained:
        failures.append("the buffer did not drain within 180 s after publishing stopped")
    if len(half) < 3:
        failures.append("too few samples of one process in the second half to judge growth")
    if summary["rss_growth_second_half_mib"] > args.max_rss_growth_mib:
        failures.append(f"RSS grew {summary['rss_growth_second_half_mib']} MiB over the second half "
                        f"(allowed {args.max_rss_growth_mib})")
    if fd_floor_growth > args.max_fd_growth:
        failures.append(f"the fewest open descriptors rose by {fd_floor_growth} over the second half "
                        f"(allowed {args.max_fd_growth})")
    if notes.get("replay") and notes["replay"][0] != 0:
        failures.append(f"dead-letters replay exited {notes['replay'][0]}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else f"soak failed; evidence in {work}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
