"""An upload as it arrives: JSONL pieces split into lines, each line parsed (either format),
validated and tokenized like any request, and appended to the job store, piece by piece.

A line that cannot run is stored as a failed result naming the line and the problem; it never
fails the upload. Memory is bounded by one piece plus one line (at most ``MAX_LINE_BYTES``).
Runs on a worker thread (tokenizing a large upload must not stall the event loop).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import grpc

from backfill.batch_format import LineError, custom_id_of, is_request_line, parse_line
from backfill.v1 import inference_pb2 as pb
from server.api.models import ModelRegistry, ServedModel, Target
from server.jobs.convert import failed_result
from server.jobs.store import JobStore, NewItem

MAX_LINE_BYTES = 8 * 1024 * 1024
ITEMS_PER_WRITE = 2048  # requests of a SubmitBatch appended per transaction


class LineSplitter:
    """Bytes in any pieces → whole lines. A line longer than max_line_bytes comes out as None
    (with its size), its bytes dropped as they arrive."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._partial = bytearray()
        self._dropped = 0  # bytes of the current line dropped for being over the limit

    def feed(self, data: bytes) -> list[tuple[bytes | None, int]]:
        out = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._hold(data[start:end])
            out.append(self._emit())
            start = end + 1
        self._hold(data[start:])
        return out

    def finish(self) -> list[tuple[bytes | None, int]]:
        return [self._emit()] if self._partial or self._dropped else []

    def _hold(self, piece: bytes) -> None:
        if self._dropped or len(self._partial) + len(piece) > self._max:
            self._dropped += len(self._partial) + len(piece)
            self._partial.clear()
        else:
            self._partial += piece

    def _emit(self) -> tuple[bytes | None, int]:
        if self._dropped:
            out: tuple[bytes | None, int] = (None, self._dropped)
        else:
            out = (bytes(self._partial), len(self._partial))
        self._partial.clear()
        self._dropped = 0
        return out


class Upload:
    """Appends one job's requests to the store as they arrive (numbered from 0)."""

    def __init__(
        self, store: JobStore, models: ModelRegistry, job_id: str, forced_model: str = ""
    ) -> None:
        self._store = store
        self._models = models
        self._job_id = job_id
        self._forced_model = forced_model
        self._splitter = LineSplitter()
        self._line_no = 0
        self.num_requests = 0
        self.num_failed = 0  # of num_requests, those that cannot run (failed on arrival)

    def add_data(self, data: bytes) -> None:
        self._add(self._splitter.feed(data))

    def finish(self) -> None:
        self._add(self._splitter.finish())

    def add_requests(self, requests: Sequence[pb.GenerateRequest]) -> None:
        """SubmitBatch's requests: the first invalid one raises InvalidArgumentError (naming
        ``requests[i]``), which discards the whole job."""
        for start in range(0, len(requests), ITEMS_PER_WRITE):
            items = []
            for req in requests[start:start + ITEMS_PER_WRITE]:
                prefix = f"requests[{self.num_requests}]."
                model, stored = _stored(req, self._models.resolve(req.model, prefix), prefix)
                items.append(NewItem(self.num_requests, req.client_request_id, "", model,
                                     stored))
                self.num_requests += 1
            self._store.add_items(self._job_id, items)

    def _add(self, lines: list[tuple[bytes | None, int]]) -> None:
        items: list[tuple[NewItem, int]] = []
        for line, size in lines:
            self._line_no += 1
            item = self._line(line, size)
            if item is not None:
                items.append((item, self._line_no))
        if items:
            self._store.add_items(self._job_id, self._unique(items))

    def _line(self, line: bytes | None, size: int) -> NewItem | None:
        if line is not None and not is_request_line(line):
            return None
        index = self.num_requests
        self.num_requests += 1
        where = f"line {self._line_no}: "
        if line is None:
            return self._failed(index, where + f"the line is {size} bytes, over the limit of "
                                f"{MAX_LINE_BYTES}")
        obj: Any = None
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise LineError(f"expected a JSON object, got {type(obj).__name__}")
            parsed = parse_line(obj)
        except (ValueError, UnicodeDecodeError) as exc:
            detail = f"not JSON: {exc}" if obj is None else str(exc)
            return self._failed(index, where + detail, custom_id_of(obj), _url_of(obj))
        request = parsed.request
        if self._forced_model:
            request.model = self._forced_model
        try:
            model, stored = _stored(request, self._models.resolve(request.model, where), where)
        except ValueError as exc:
            return self._failed(index, str(exc), parsed.custom_id, parsed.url, request.model)
        return NewItem(index, parsed.custom_id, parsed.url, model, stored)

    def _failed(
        self, index: int, message: str, custom_id: str = "", url: str = "", model: str = ""
    ) -> NewItem:
        self.num_failed += 1
        result = failed_result(
            job_id=self._job_id, index=index, custom_id=custom_id, url=url, model=model,
            code=grpc.StatusCode.INVALID_ARGUMENT, message=message, at=time.time(),
        )
        return NewItem(index, custom_id, url, model, None, result)

    def _unique(self, items: list[tuple[NewItem, int]]) -> list[NewItem]:
        """Fails each request whose custom_id an earlier one of the job already uses."""
        ids = {item.custom_id for item, _ in items if item.custom_id}
        seen = self._store.known_custom_ids(self._job_id, ids) if ids else set()
        out = []
        for item, line_no in items:
            cid = item.custom_id
            if cid and cid in seen:
                dup = self._failed(item.index, f"line {line_no}: custom_id {cid!r} is used by "
                                   "an earlier request of the job", cid, item.url, item.model)
                # Stored without its id (ids are unique per job); its result still names it.
                out.append(NewItem(item.index, "", item.url, item.model, None, dup.failure))
                continue
            seen.add(cid)
            out.append(item)
        return out


def _stored(request: pb.GenerateRequest, target: Target, prefix: str) -> tuple[str, bytes]:
    """Validates a request (ValueError naming the field) and returns the model it is stored
    for and the request as the store keeps it. For a served model, its prompt as token ids, so
    it is tokenized (chat template included) once, not again each time it is fed; for the
    router (``auto``), as it came: the model is chosen when it runs, in that model's tokens."""
    prepared = target.prepare(request, force_offline=True, prefix=prefix)
    if not isinstance(target, ServedModel):
        request.model = ModelRegistry.AUTO
        return request.model, request.SerializeToString()
    request.token_ids.ids[:] = prepared.request.prompt_token_ids  # replaces the text or chat
    return target.name, request.SerializeToString()


def _url_of(obj: Any) -> str:
    url = obj.get("url") if isinstance(obj, dict) else None
    return url if isinstance(url, str) else ""
