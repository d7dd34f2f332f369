"""``llm.v1``: messages in ``llm_pb2``, the ``Inference`` service in ``llm_pb2_grpc``."""
