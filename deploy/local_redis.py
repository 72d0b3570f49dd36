"""An embedded Redis-protocol server for machines without Redis (demo only: slow).

fakeredis's TcpFakeServer speaks enough of the protocol for Celery, pub/sub and Streams.
"""

from __future__ import annotations

import argparse
import contextlib

from fakeredis import TcpFakeServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6390)
    args = parser.parse_args()
    server = TcpFakeServer((args.host, args.port), server_type="redis")
    print(f"fake redis on {args.host}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
