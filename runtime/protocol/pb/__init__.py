"""Generated protobuf and gRPC code for splitserve's wire protocols.

Generated from proto/*.proto by `python tools/gen_proto.py`: never edit these
files by hand; tests/protocol/test_pb_fresh.py fails when they are stale.

    grpc_service_pb2, grpc_service_pb2_grpc     KServe v2 / Triton `inference`
    model_config_pb2                            inference.ModelConfig
    splitserve_management_pb2, ..._pb2_grpc     splitserve.management.v1

The descriptors live in POOL, a descriptor pool of their own, not in
protobuf's default pool: tritonclient registers its own copy of Triton's
`inference` package in the default pool, and both must load in one process.
Pass POOL wherever a pool is asked for (e.g. grpc reflection).
"""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()

# The generator that wrote this package (its protoc stamps the _pb2 modules).
GENERATED_WITH = {"grpcio-tools": "1.80.1"}
