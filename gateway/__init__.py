"""The WebSocket gateway: bridges the bus to browser clients (installed as ``nexus.gateway``)."""
