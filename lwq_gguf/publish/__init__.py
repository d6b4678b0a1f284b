"""Publish (on top of the stages): what is inside a GGUF (``inspect``), families of files and
model cards."""
