"""Generated protobuf and gRPC code for trainer.v1 (scripts/gen-proto)."""
