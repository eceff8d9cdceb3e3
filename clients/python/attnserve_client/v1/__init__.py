"""Generated protobuf and gRPC stubs of attnserve.v1 (see proto/)."""
