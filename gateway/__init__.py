"""Tandem's gateway: the only public face of the service.

Serves `tandem.v1.Generation` (plus gRPC health and reflection), optionally over TLS and
behind API keys (`security.py`); validates requests, routes each to a ready engine (a
tokenizer_svc; by prompt prefix within a load margin, `affinity.py`, else the least loaded)
over the internal API, relays the output, maps every failure to a
gRPC status code, and cancels requests downstream when clients go away. On SIGTERM it drains
(`GatewayServer.drain`). Run it with `python -m gateway`; build it in-process with
`gateway.server.build_server(GatewayConfig(...))`.
"""
