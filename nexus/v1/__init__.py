"""Generated gRPC stubs for the nexus.v1 contract (protos/nexus/v1/nexus.proto); see scripts/gen_protos.py."""
