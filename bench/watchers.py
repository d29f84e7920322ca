"""N raw watchers of one job in a process of their own: `python bench/watchers.py ADDR JOB N`.

bench/service.py starts it at the lowest CPU priority to stand in for watchers on other
machines: on a 2-core box their own protobuf parsing would otherwise compete with the training
it measures, which remote watchers' CPUs never do. It prints each watcher's step count.
"""

from __future__ import annotations

import sys
import threading

from service import watch_raw
from stepstream.client import TrainingClient


def main() -> int:
    address, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    steps: list[list[int]] = [[] for _ in range(count)]
    with TrainingClient(address) as client:
        print("ready", flush=True)
        threads = [
            threading.Thread(target=watch_raw, args=(client, name, steps[i])) for i in range(count)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(" ".join(str(len(s)) for s in steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
