"""llm-gateway: an OpenAI-compatible HTTP API in front of several llm_service replicas.

``create_app(build_gateway(settings))`` is the ASGI application; ``llm-gateway`` runs it with
uvicorn. Only this package imports the web framework.
"""

from llm_service.gateway.app import Gateway, build_gateway, create_app
from llm_service.gateway.replicas import Replica, ReplicaPool, ReplicaState, RoutedStream

__all__ = [
    "Gateway",
    "Replica",
    "ReplicaPool",
    "ReplicaState",
    "RoutedStream",
    "build_gateway",
    "create_app",
]
