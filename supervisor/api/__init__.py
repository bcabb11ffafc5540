"""The APIs side by side, all adapters over one request path (inference.py): the gRPC service, and the
OpenAI- and Ollama-compatible HTTP APIs on one aiohttp server; the checks every request passes."""
