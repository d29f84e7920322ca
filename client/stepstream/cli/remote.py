"""What the commands that talk to a server share: the address they default to, and a client
made from their connection flags (--address, --token, --tls, --ca-cert, --client-cert,
--client-key)."""

from __future__ import annotations

import argparse

DEFAULT_ADDRESS = "localhost:50051"


def connect(args: argparse.Namespace):
    from stepstream.client import TrainingClient

    return TrainingClient(args.address, **credentials(args))


def credentials(args: argparse.Namespace) -> dict:
    return {
        "token": args.token,
        "tls": args.tls,
        "ca_cert": args.ca_cert,
        "client_cert": args.client_cert,
        "client_key": args.client_key,
    }
