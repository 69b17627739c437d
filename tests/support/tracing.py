"""Kernel connect events in the tests: a child making short connections, and histstat's
tracefs instance."""

from __future__ import annotations

import os

from support.histstat import Histstat

# A child with a listener on 127.0.0.1: prints "PORT", then on "go" connects to it
# COUNT times, every PAUSE seconds, each connection closed after about 1 ms, and prints
# the client ports used; then it exits at once when EXIT is "exit", else waits for its
# stdin to close.
BEACON = """
import socket, sys, time
count, pause, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
sys.stdin.readline()
ports = []
for _ in range(count):
    client = socket.create_connection(listener.getsockname())
    ports.append(client.getsockname()[1])
    accepted, _ = listener.accept()
    time.sleep(0.001)
    client.close()
    accepted.close()
    time.sleep(pause)
print(*ports, flush=True)
if mode != "exit":
    sys.stdin.read()
"""


def instances_of(root: str, pid: int) -> list[str]:
    prefix = f"histstat-{pid}-"
    return [name for name in os.listdir(os.path.join(root, "instances")) if name.startswith(prefix)]


def ready(histstat: Histstat, root: str) -> None:
    """Wait until histstat's instance traces: events are recorded from then on."""

    def tracing():
        # A new instance traces at once (tracing_on 1) until histstat turns it off to set
        # it up: only the event enabled and tracing on again say the setup is done.
        for name in instances_of(root, histstat.proc.pid):
            instance = os.path.join(root, "instances", name)
            try:
                with open(os.path.join(instance, "events/sock/inet_sock_set_state/enable")) as on:
                    enabled = on.read().strip() == "1"
                with open(os.path.join(instance, "tracing_on")) as flag:
                    return enabled and flag.read().strip() == "1"
            except OSError:
                return False
        return False

    histstat.until(tracing, what="histstat's tracefs instance tracing")
