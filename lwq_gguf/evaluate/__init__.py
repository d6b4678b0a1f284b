"""Evaluate (floor 1 in docs/design.md): llama-perplexity's protocol in llama.cpp (PPL, KLD), in a
torch-free child with a CUDA build. It needs only llama.cpp, so it sits below every stage: the
write stage's check runs it directly, and `compare` (:mod:`lwq_gguf.publish.compare`) measures with
it."""
