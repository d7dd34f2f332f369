"""The wire API of llm_service: ``v1/llm.proto`` and its generated stubs (``scripts/gen_proto``).

Only the gRPC server (``llm_service.server``) and the client import these modules.
"""
