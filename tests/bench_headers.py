"""Issue: the control-header rewrite on every DATA. What skipping it saves per message.

Not a test (no timed assertion): run it and quote the numbers.

    .venv/bin/python -m tests.bench_headers [ROUNDS]

Times, on a 100 KB message without control headers (a short header section and a long
one, as with many Received and DKIM fields), what handle_DATA did before (parse_headers,
then remove_headers, which scans the header section again only to find nothing to
remove) and what it does now (parse_headers, then without_control_headers, which looks at
the parsed fields only). Best of 5 runs of ROUNDS messages, per message.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from functools import partial

from relay.delivery.routing import CONTROL_HEADERS, without_control_headers
from relay.smtp.headers import parse_headers, remove_headers

BODY = (b"x" * 76 + b"\r\n") * (100_000 // 78)


def message(extra_fields: int) -> bytes:
    head = [b"From: app@example.com", b"To: someone@example.org", b"Subject: report",
            b"Date: Tue, 01 Dec 2026 03:00:00 +0000", b"Message-ID: <a.b@example.com>",
            b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=utf-8"]
    head += [b"Received: from host%d.example.net (host%d.example.net [192.0.2.%d])\r\n"
             b"\tby mx.example.com with ESMTPS id %d; Tue, 01 Dec 2026 03:00:00 +0000"
             % (i, i, i % 250, i) for i in range(extra_fields)]
    return b"\r\n".join(head) + b"\r\n\r\n" + BODY


def best(step: Callable[[], object], rounds: int) -> float:
    """Seconds per call: the best of 5 runs of ``rounds`` calls."""
    return min(timeit.repeat(step, number=rounds, repeat=5)) / rounds


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    for label, extra in (("short header (7 fields)", 0), ("long header (7 + 40 Received)", 40)):
        raw = message(extra)
        fields = parse_headers(raw)
        assert without_control_headers(raw, fields) is raw
        parse = best(partial(parse_headers, raw), rounds)
        before = best(partial(remove_headers, raw, CONTROL_HEADERS), rounds)
        after = best(partial(without_control_headers, raw, fields), rounds)
        us = 1e6
        print(f"{label}, {len(raw)} bytes: parse_headers {parse * us:.2f} us;"
              f" control-header step before {before * us:.2f} us, after {after * us:.2f} us"
              f" (header work per DATA {(parse + before) * us:.2f} ->"
              f" {(parse + after) * us:.2f} us)")

if __name__ == "__main__":
    main()
