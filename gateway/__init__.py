"""The WebSocket gateway: bridges the bus to browser clients (installed as ``nexus.gateway``).

- ``protocol``: the JSON frames of DESIGN.md §5 and the error-code table, pure.
- ``flow``: the per-connection outbox (bounded in frames and bytes) and the rate limiter, pure.
- ``auth``: the authentication hook and where tokens come from.
- ``backend``: what the gateway needs from a Nexus; ``LocalBackend`` inside ``nexus serve``.
- ``remote``: ``RemoteBackend``, a relay of a Nexus reached over gRPC (``nexus gateway --nexus HOST:PORT``).
- ``link``: one connection's subscription, requests and their leases.
- ``connection``: one WebSocket: reading frames, the outbox and its writer.
- ``server``: ``GatewayServer`` on ``websockets.asyncio.server``: ``/ws``, the page at ``/``, ``static/``.
"""
