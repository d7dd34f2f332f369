"""``python -m llm_service.gateway``: the same as ``llm-gateway``."""

import sys

from llm_service.flags import quiet_grpc_core

quiet_grpc_core()  # before gRPC is first imported

from llm_service.gateway.cli import main  # noqa: E402

sys.exit(main())
