"""llm_service: an LLM inference service on llama.cpp."""
