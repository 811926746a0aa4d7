"""A naive MQTT -> Lambda bridge: the baseline of the slow-uplink benchmark (benches/ingest.rs).

What a person writes in an afternoon: paho-mqtt subscribes with QoS 1 on a persistent session,
its network thread puts each message on a queue, and N worker threads each POST one event per
message to Lambda's Invoke API (`X-Amz-Invocation-Type: Event`, unsigned: the benchmark's fake
Lambda does not check signatures) over a kept-alive HTTP connection. paho acknowledges a message
when the callback returns, before it is invoked: nothing here is durable. A failed POST is
retried after a short pause.

    python_bridge.py --port 1883 --client-id py --topic 'bench/#' \
        --lambda-port 9000 --function sink [--threads 8] [--register]

`--register` connects, subscribes, waits for the SUBACK and disconnects, so the broker keeps a
session that queues a backlog. Runs until killed.
"""

import argparse
import datetime
import http.client
import json
import queue
import threading
import time
import uuid

import paho.mqtt.client as mqtt

RETRY_PAUSE_S = 0.1


def event(msg):
    try:
        payload = json.loads(msg.payload)
    except ValueError:
        payload = msg.payload.decode("utf-8", "replace")
    now = datetime.datetime.now(datetime.timezone.utc)
    return json.dumps(
        {
            "rule": "bench",
            "messages": [
                {
                    "id": str(uuid.uuid4()),
                    "topic": msg.topic,
                    "payload": payload,
                    "qos": msg.qos,
                    "retain": bool(msg.retain),
                    "received_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                }
            ],
        }
    ).encode()


def worker(work, port, function):
    path = f"/2015-03-31/functions/{function}/invocations"
    headers = {"X-Amz-Invocation-Type": "Event", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port)
    while True:
        body = event(work.get())
        while True:
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                if response.status < 300:
                    break
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port)
            time.sleep(RETRY_PAUSE_S)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--lambda-port", type=int, required=True)
    parser.add_argument("--function", required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--register", action="store_true")
    args = parser.parse_args()

    work = queue.Queue()
    subscribed = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(client, userdata, msg):
        work.put(msg)

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    if args.register:
        client.loop_start()
        if not subscribed.wait(30):
            raise SystemExit("no SUBACK within 30 s")
        client.disconnect()
        client.loop_stop()
        return
    for _ in range(args.threads):
        threading.Thread(
            target=worker, args=(work, args.lambda_port, args.function), daemon=True
        ).start()
    client.loop_forever()


if __name__ == "__main__":
    main()
