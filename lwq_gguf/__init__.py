"""lwq-gguf: layer-wise mixed-precision GGUF quantization for llama.cpp.

Pipeline stages, one module each: load -> score -> plan -> write (convert + quantize) -> verify.
"""

__version__ = "0.1.0"
