"""The gRPC adapter: servicer and message conversions."""
