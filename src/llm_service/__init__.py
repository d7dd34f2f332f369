"""llm_service: an LLM inference service on llama.cpp."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-service")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
