"""Backfill engine builder: ``python -m engine_builder {fetch-default,build,inspect,run,profile}``.

An engine is a directory described by ``manifest.json`` (docs/engine-format.md). Modules, one
concept each: ``manifest`` (+ ``manifest_json``) the schema; ``tokenizer`` text <-> ids and
streaming detokenization; ``gguf_source`` / ``hf_source`` read checkpoints into a
``source.SourceModel``; ``quantize`` int8/int4; ``build`` writes a cpu engine; ``fetch`` /
``default`` the default model and engine; ``tiny`` the test model; ``footprint`` memory sizes;
``cli`` with ``inspect_cmd``, ``run_cmd`` and ``profile`` the commands.
"""
