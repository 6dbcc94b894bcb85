"""Generated from protos/backfill/v1 by `make proto`; do not edit."""
