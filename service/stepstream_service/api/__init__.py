"""The API layer: protobuf in, validated requests and store calls, protobuf out."""
