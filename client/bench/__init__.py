"""Load generation for Backfill: trace replay and Poisson arrivals (``trace``), the driver
(``loadgen``) and the report (``report``). ``python -m client bench`` is the command line."""
