"""What operators watch: Prometheus metrics, the HTTP endpoints, structured logs, and
the webhooks that delivery events are POSTed to (webhooks.py).

Edges that any other edge may use. Only here (and relay.app) imports prometheus_client
and aiohttp.
"""
