"""Generated gRPC code (vmft_pb2, vmft_pb2_grpc) from vmft.proto; scripts/setup generates it."""
