"""The gRPC service (``llm.v1.Inference`` with mutual TLS) and its HTTP health/metrics port.

Only this package and the client import ``grpc`` and the generated stubs.
"""

from llm_service.server.app import SERVICE_NAME, serve
from llm_service.server.servicer import InferenceServicer
from llm_service.server.state import Phase, ServerState
from llm_service.server.status import STATUS_CODES, status_for

__all__ = ["SERVICE_NAME", "STATUS_CODES", "InferenceServicer", "Phase", "ServerState", "serve",
           "status_for"]  # fmt: skip
