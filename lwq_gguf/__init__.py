"""lwq-gguf: layer-wise mixed-precision GGUF quantization for llama.cpp.

Sub-packages by pipeline stage - model -> score -> plan -> write -> evaluate - on the shared
``quant`` layer (types, encoders, imatrix), composed once in ``pipeline`` and driven by ``cli``.
See docs/design.md.
"""

__version__ = "0.1.0"
