"""``model=auto``: a router that picks the engine for each request (router.py) under a
pluggable policy (policy.py): rules on the request, or a cascade (cascade.py) in which the small
model answers first and the large model only when the small one is unsure."""
