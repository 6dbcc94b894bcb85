"""The gRPC surface: the InferenceService servicer and its multiplexed Session streams."""
