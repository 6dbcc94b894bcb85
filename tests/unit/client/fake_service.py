"""A small scripted ``InferenceService`` for SDK tests that need what the real server cannot be
made to do on demand: any status code, a Session stream that breaks, a draining server.

Tokens are a pure function of the prompt (``(len(prompt) + i) % 1000``), one per chunk. A text
prompt ``"error:CODE"`` fails the request with that status code (per request on a Session,
as the RPC status on Generate); ``"break"`` aborts the whole Session stream with UNAVAILABLE the
first ``breaks`` times it is seen; ``"empty"`` finishes (STOP) without a token.

``batching=True`` makes it a server that accepts ``SessionRequest.batch`` (it sends the header)
and, once a client sent one, answers with batched responses whenever several are queued;
without it, it is an older server that knows neither. ``messages`` records every
SessionRequest received, ``requests`` every GenerateRequest started; ``models`` is what
ListModels answers.
"""

from __future__ import annotations

import asyncio
import threading

import grpc

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc


def expected_tokens(prompt: str, n: int) -> list[int]:
    return [(len(prompt) + i) % 1000 for i in range(n)]


class FakeService(pb_grpc.InferenceServiceServicer):
    def __init__(self, breaks: int = 0, drops: int = 0, batching: bool = False,
                 models: tuple[pb.ModelInfo, ...] = ()) -> None:
        self.breaks = breaks
        self.models = models
        self.requests: list[pb.GenerateRequest] = []
        self.batching = batching
        self.messages: list[pb.SessionRequest] = []
        self.drops = drops  # Generate calls "drop" ends like a call grpc dropped on its own
        self.cancels: list[str] = []
        self.sessions_opened = 0

    def _chunks(self, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
        self.requests.append(req)
        if req.text == "empty":
            return [pb.GenerateResponse(client_request_id=req.client_request_id,
                                        finish_reason=pb.FINISH_REASON_STOP)]
        n = req.sampling.max_tokens if req.sampling.HasField("max_tokens") else 4
        out = [
            pb.GenerateResponse(
                token_ids=[t], text=f"<{t}>", client_request_id=req.client_request_id
            )
            for t in expected_tokens(req.text, n)
        ]
        out[-1].finish_reason = pb.FINISH_REASON_LENGTH
        out[-1].usage.completion_tokens = n
        return out

    async def Generate(self, request, context):
        if request.text.startswith("error:"):
            await context.abort(grpc.StatusCode[request.text[6:]], "injected")
        if request.text == "drop" and self.drops > 0:
            self.drops -= 1
            await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        for chunk in self._chunks(request):
            yield chunk

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=self.models)

    async def Session(self, request_iterator, context):
        self.sessions_opened += 1
        out: asyncio.Queue[pb.SessionResponse | None] = asyncio.Queue()
        tasks: dict[str, asyncio.Task[None]] = {}

        async def run(req: pb.GenerateRequest) -> None:
            rid = req.client_request_id
            if req.text.startswith("error:"):
                code = grpc.StatusCode[req.text[6:]].value[0]
                await out.put(pb.SessionResponse(client_request_id=rid, error=pb.Status(
                    code=code, message="injected")))
                return
            for chunk in self._chunks(req):
                await asyncio.sleep(0.001 if req.text != "slow" else 0.05)
                await out.put(pb.SessionResponse(client_request_id=rid, chunk=chunk))

        def cancel(rid: str) -> None:
            self.cancels.append(rid)
            task = tasks.pop(rid, None)
            if task is not None:
                task.cancel()

        async def start(req: pb.GenerateRequest) -> None:
            if req.text == "break" and self.breaks > 0:
                self.breaks -= 1
                await out.put(None)
            else:
                tasks[req.client_request_id] = asyncio.ensure_future(run(req))

        batched = False

        async def pump() -> None:
            nonlocal batched
            async for msg in request_iterator:
                self.messages.append(msg)
                kind = msg.WhichOneof("kind")
                if kind == "cancel":
                    cancel(msg.cancel)
                elif kind == "generate":
                    await start(msg.generate)
                elif kind == "batch" and self.batching:
                    batched = True
                    for req in msg.batch.generate:
                        await start(req)
                    for rid in msg.batch.cancel:
                        cancel(rid)

        if self.batching:
            await context.send_initial_metadata((("backfill-session-batch", "1"),))
        pumper = asyncio.ensure_future(pump())
        try:
            broken = False
            while not broken:
                item = await out.get()
                if item is None:
                    break
                if batched and not out.empty():
                    items = [item]
                    while not out.empty():
                        more = out.get_nowait()
                        if more is None:
                            broken = True
                            break
                        items.append(more)
                    item = pb.SessionResponse(batch=items)
                yield item
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stream broken on purpose")
        finally:
            pumper.cancel()
            for task in tasks.values():
                task.cancel()


class FakeServer:
    """Runs a FakeService on its own loop thread; ``address`` is ``127.0.0.1:PORT``."""

    def __init__(self, service: FakeService) -> None:
        self.service = service
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(self.service, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._loop.run_until_complete(self._server.start())
        self._ready.set()
        self._loop.run_forever()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


