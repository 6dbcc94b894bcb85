"""The OpenAI-compatible HTTP surface (Starlette on uvicorn)."""
