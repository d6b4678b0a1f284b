"""Publish (on top of the stages): stage 7, `compare` against llama.cpp's mixes; families of files
and their model cards; what is inside a GGUF (``inspect``)."""
