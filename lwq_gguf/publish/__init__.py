"""Publish (floor 5 in docs/design.md, on top of the pipeline): what `convert` runs
(:mod:`.release`), `compare` against llama.cpp's mixes; families of files and their model cards;
what is inside a GGUF (``inspect``)."""
