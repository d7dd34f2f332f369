"""``llm.v1``: messages in ``llm_pb2``, the ``Inference`` service in ``llm_pb2_grpc``."""

# Largest message either side accepts (a long prompt, or a grammar, fits with room to spare).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
