"""Two stratacache nodes, one cache: a Store through one is a hit through the other, and an
invalidation through either reaches both.

    stratacache serve --port 50551 --data-dir node-a --shared-store "$DSN" &
    stratacache serve --port 50552 --data-dir node-b --shared-store "$DSN" &
    python examples/two_nodes.py 127.0.0.1:50551 127.0.0.1:50552
"""

import sys
import time

from stratacache import Client

a, b = Client(sys.argv[1]), Client(sys.argv[2])
a.store("How do I reset my password?", "Use the link on the sign-in page.", namespace="demo")

hit = b.lookup("How can I reset my password?", namespace="demo")
print(f"node B: hit={hit.hit} tier={hit.tier} answer={hit.text!r}")

removed = b.invalidate_namespace("demo")
deadline = time.monotonic() + 5  # every node applies it within a second; give it five
while a.lookup("How do I reset my password?", namespace="demo").hit:
    if time.monotonic() > deadline:
        sys.exit("node A still serves the invalidated entry")
    time.sleep(0.05)
print(f"node B invalidated {removed} entry; node A no longer serves it")
