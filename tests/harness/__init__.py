"""The test harness: real second processes (llm_service, llm-gateway) and the fixtures every
test layer shares (``fixtures``, a pytest plugin loaded by ``tests/conftest.py``)."""
