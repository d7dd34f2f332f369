"""``python -m llm_service.gateway``: the same as ``llm-gateway``."""

import sys

from llm_service.cli import llm_gateway

sys.exit(llm_gateway())
