"""Backfill's generated API packages (see protos/)."""
