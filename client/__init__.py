"""Backfill Python SDK: an async core (``AsyncClient``) and a thin sync wrapper (``Client``).

>>> from client import Client, SamplingParams
>>> with Client("127.0.0.1:50051") as c:  # doctest: +SKIP
...     print(c.complete("Hello", sampling=SamplingParams(max_tokens=8)).text)
"""

from __future__ import annotations

from client._stream import GenerationStream
from client.aio import AsyncClient
from client.credentials import tls_credentials
from client.errors import (
    AlreadyExists,
    BackfillError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_from_status,
)
from client.sync import Client, SyncIterator
from client.types import (
    BatchJob,
    BatchRequest,
    BatchResult,
    ChatMessage,
    Chunk,
    Completion,
    FinishReason,
    JobState,
    ModelInfo,
    SamplingParams,
    Stats,
    StepBudget,
    Tier,
    TierStats,
    Timing,
    Usage,
)

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "BackfillError",
    "BatchJob",
    "BatchRequest",
    "BatchResult",
    "Cancelled",
    "ChatMessage",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FinishReason",
    "GenerationStream",
    "Internal",
    "InvalidArgument",
    "JobState",
    "MessageTooLarge",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SamplingParams",
    "Stats",
    "StepBudget",
    "SyncIterator",
    "Tier",
    "TierStats",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "error_from_status",
    "tls_credentials",
]
