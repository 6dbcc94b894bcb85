"""Backfill's API (``backfill.v1``, generated from protos/) and the small pieces that client,
server and engine builder share: the transport's limits, progress bars and the JSONL formats of
batch jobs (``backfill.batch_format``)."""
