"""Subprocess used by test_outcomes: receive N messages, never settle them, then wait to be killed.

usage: python unsettling_consumer.py URL ADDRESS COUNT
Prints "received <COUNT>" on stdout once all messages have arrived.
"""

import sys
import time

from proton.utils import BlockingConnection


def main():
    url, address, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conn = BlockingConnection(url, timeout=20)
    rcv = conn.create_receiver(address, credit=count)
    print("attached", flush=True)
    got = 0
    while got < count:
        rcv.receive(timeout=20)  # leaves the delivery unsettled
        got += 1
    print("received %d" % got, flush=True)
    # keep the connection alive (and unsettled) until the test SIGKILLs us
    deadline = time.monotonic() + 60
    conn.container.timeout = 0.2
    while time.monotonic() < deadline:
        conn.container.process()


if __name__ == "__main__":
    main()
