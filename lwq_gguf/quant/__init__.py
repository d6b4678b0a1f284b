"""The quantization stage (floor 1 in docs/design.md): the one table of GGUF quant types (from
gguf's own constants), tensor sizes, the pinned ggml's quantizers (ctypes), lwq-gguf's own Q4_K
encoder (csrc/), the importance-matrix format and a GGUF header reader."""
