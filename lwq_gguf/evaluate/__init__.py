"""Stage 6 - evaluate (and 7, compare): llama-perplexity's protocol in llama.cpp (PPL, KLD), in a
torch-free child with a CUDA build, and `compare` against llama.cpp's own mixes."""
