"""The capacity planner: the real backfill scheduler on simulated accelerators (docs/planner.md).

Every figure it produces is simulated: a model of an engine (a step-cost model and the engine's
slots and KV blocks), driven by the same scheduler code the server runs, on a virtual clock.
"""
