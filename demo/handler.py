"""Demo Lambda handler: records every event it receives, one JSON object per line."""

import json
import os


def handler(event, context):
    with open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
    return {"received": len(event.get("messages", []))}
