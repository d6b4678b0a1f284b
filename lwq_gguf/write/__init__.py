"""The write stage (floor 3 in docs/design.md): the pinned converter in a child process, the
single-pass (or two-step) writer, the read-back check, and the Ollama Modelfile."""
