"""gRPC helpers shared by every service: conversions, server setup, channels, registration."""
