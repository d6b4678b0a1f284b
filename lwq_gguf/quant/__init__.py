"""The quantization layer every stage stands on: the one table of GGUF quant types (from gguf's
own constants), the GGUF tensor list, the pinned ggml's quantizers (ctypes), lwq-gguf's own Q4_K
encoder (csrc/) and the importance-matrix format."""
