"""Stage 4 - write: the pinned converter in a child process, the single-pass (or two-step)
writer, the read-back check, and the Ollama Modelfile."""
