"""N raw watchers of one job in a process of their own: `python bench/watchers.py ADDR JOB N`.

bench/service.py starts it at the lowest CPU priority to stand in for watchers on other
machines: on a 2-core box their own protobuf parsing would otherwise compete with the training
it measures, which remote watchers' CPUs never do. It prints each watcher's step count.
"""

from __future__ import annotations

import sys
import threading

import grpc

from trainer.v1 import trainer_pb2 as pb
from trainer.v1 import trainer_pb2_grpc


def main() -> int:
    address, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    channel = grpc.insecure_channel(address)
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    counts = [0] * count
    print("ready", flush=True)

    def watch(i: int) -> None:
        for response in stub.WatchJob(pb.WatchJobRequest(name=name)):
            if response.WhichOneof("kind") == "batch":
                counts[i] += sum(
                    1 for e in response.batch.events if e.WhichOneof("payload") == "step"
                )

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(" ".join(map(str, counts)), flush=True)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
