"""Generated protobuf/gRPC modules for ``stratacache.v1`` (written here by the build from
``protos/stratacache/v1/stratacache.proto``; never edit or commit them)."""
