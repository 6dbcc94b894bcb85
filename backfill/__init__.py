"""Backfill's API: the generated gRPC packages (``backfill.v1``, see protos/) and the JSONL
formats of batch jobs (``backfill.batch_format``), shared by the server and the SDK."""
