#!/usr/bin/env python3
"""Create the demo Lambda function (demo/handler.py) on a Lambda-compatible endpoint.

Usage: deploy_function.py --endpoint http://127.0.0.1:PORT --name NAME --record-file PATH
                          [--region us-east-1]

Standard library only. An existing function of that name counts as success.
"""

import argparse
import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
import zipfile

HANDLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "handler.py")


def zipped_handler() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(HANDLER, arcname="handler.py")
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="e.g. http://127.0.0.1:4566")
    parser.add_argument("--name", required=True, help="function name")
    parser.add_argument("--record-file", required=True, help="where the handler appends events")
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()

    body = {
        "FunctionName": args.name,
        "Runtime": "python3.11",
        "Role": "arn:aws:iam::000000000000:role/demo",
        "Handler": "handler.handler",
        "Code": {"ZipFile": base64.b64encode(zipped_handler()).decode("ascii")},
        "Environment": {"Variables": {"RECORD_FILE": os.path.abspath(args.record_file)}},
    }
    request = urllib.request.Request(
        args.endpoint.rstrip("/") + "/2015-03-31/functions",
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={
            "Content-Type": "application/json",
            # Local emulators only read the access key and region from the signature.
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential=test/20260101/{args.region}/lambda/aws4_request, "
                "SignedHeaders=host, Signature=x"
            ),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(f"created function {args.name} (HTTP {response.status})")
            return 0
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        if err.code == 409:  # ResourceConflictException: a function of that name exists
            print(f"function {args.name} already exists")
            return 0
        print(f"deploy_function: creating {args.name} failed: HTTP {err.code}: {text.strip()}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as err:
        print(f"deploy_function: cannot reach {args.endpoint}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
