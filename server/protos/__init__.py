"""Generated protobuf and gRPC stubs; regenerate with scripts/gen_proto.py, never edit."""
