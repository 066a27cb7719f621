"""The gRPC frontend: GRPCInferenceService, standard health and reflection on one port."""
