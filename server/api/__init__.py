"""The API surfaces, gRPC (``grpc/``) and OpenAI-compatible HTTP (``http/``), over what they
share: request validation (``validation.py``), conversion between wire messages and the
scheduler's types (``convert.py``), the tenant a request acts for (``identity.py``), the
thread bridge from the scheduler to asyncio (``streams.py``) and n-choice requests
(``choices.py``). A request flows one way: surface → validation → conversion → scheduler, and
its events back through the same surface."""
