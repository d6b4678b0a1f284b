"""Stage 6 - publish: what is inside a GGUF (``inspect``), families of files and model cards."""
