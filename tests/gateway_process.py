"""One metered gateway as its own OS process, for the multi-process and crash tests.

    python tests/gateway_process.py --upstream URL/v1 --database-url URL --seller ID \
        --pricing '{"input_per_1k": "0.0005", ...}' --port P [--tokenizer DIR] [--hold-ttl S]

The CLI's `hf-escrow gateway` has no hold TTL option; this script does, so that a
killed gateway's holds expire within a test.
"""

from __future__ import annotations

import argparse
import json

import uvicorn

import hf_escrow
from hf_escrow.gateway import DEFAULT_HOLD_TTL_S, create_gateway


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--seller", required=True)
    parser.add_argument("--pricing", required=True, help="the price sheet as JSON")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--hold-ttl", type=float, default=DEFAULT_HOLD_TTL_S)
    args = parser.parse_args()
    seller = hf_escrow.connect(agent=args.seller, database_url=args.database_url)
    app = create_gateway(args.upstream, escrow=seller, pricing=json.loads(args.pricing), tokenizer=args.tokenizer,
                         hold_ttl_s=args.hold_ttl)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
