"""What operators watch: Prometheus metrics, the HTTP endpoints, structured logs.

Edges that any other edge may use. Only here (and relay.app) imports prometheus_client
and aiohttp.
"""
