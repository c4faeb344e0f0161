"""The WebSocket gateway: bridges a :class:`~nexus.node.Node` to browser clients (installed as ``nexus.gateway``).

It takes a node (``LocalNode`` inside ``nexus serve``, ``RemoteNode`` for ``nexus gateway --nexus HOST:PORT``) and
imports neither the provider nor a bus implementation.

- ``protocol``: the JSON frames of the WebSocket protocol and the error-code table, pure.
- ``flow``: the per-connection outbox (bounded in frames and bytes) and the rate limiter, pure.
- ``auth``: the authentication hook and where tokens come from.
- ``link``: one connection's subscription and its requests (request sessions).
- ``connection``: one WebSocket: reading frames, the outbox and its writer.
- ``server``: ``GatewayServer`` on ``websockets.asyncio.server``: ``/ws``, the page at ``/``, ``static/``; the
  ``Origin`` check (``nexus.origins``) and TLS (``ssl_context``) at the door.
"""
