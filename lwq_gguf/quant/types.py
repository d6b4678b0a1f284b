"""The one table of quantization types, derived from gguf-py's own constants.

Names are llama.cpp's lower-case type names (``q4_k``, ``q8_0``), as accepted by
``llama-quantize --tensor-type``. Sizes come from ``gguf.GGML_QUANT_SIZES``; nothing here restates
a block size by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from lwq_gguf.errors import PlanError


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml: GGMLQuantizationType
    block: int
    type_size: int
    needs_imatrix: bool

    @property
    def bpw(self) -> float:
        """Bits per weight of a tensor stored in this type."""
        return self.type_size * 8 / self.block

    def fits(self, row_len: int) -> bool:
        """True when a row of ``row_len`` weights (ggml ne0) can be stored in this type."""
        return row_len % self.block == 0


# Target types a plan may use (and llama-quantize accepts); float types for tensors kept unquantized.
_NAMES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0",
    "iq4_xs", "iq4_nl", "q3_k", "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs",
)
_NEED_IMATRIX = {"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"}


def _build() -> dict[str, QuantType]:
    table = {}
    for name in _NAMES:
        g = GGMLQuantizationType[name.upper()]
        block, size = GGML_QUANT_SIZES[g]
        table[name] = QuantType(name, g, block, size, name in _NEED_IMATRIX)
    return table


QUANT_TYPES: dict[str, QuantType] = _build()

DEFAULT_LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")  # the paper's strategies
# --strategy auto also weighs ggml's round-to-nearest types: dominated on most weights (and then
# never chosen), exact on weights that already sit on their grid (QAT or re-exported models)
AUTO_LADDER = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")


# who encodes the blocks (lwq_gguf.quant.encoder): lwq-gguf's own Q4_K + ggml's other types, or
# ggml's for all (llama-quantize's bytes). The one default is the first.
ENCODERS = ("lwq", "ggml")
DEFAULT_ENCODER = ENCODERS[0]


def default_ladder(strategy: str) -> tuple[str, ...]:
    return AUTO_LADDER if strategy == "auto" else DEFAULT_LADDER

# llama.cpp's fallback for a row length the type's block does not divide (tensor_type_fallback in
# src/llama-quant.cpp at the pin). 32-block types that still do not fit become F16.
_FALLBACK = {
    "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl", "iq3_xxs": "iq4_nl",
    "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl",
    "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
}

# The pure llama.cpp file type that best labels a file dominated by a type (general.file_type).
_FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q6_k": LlamaFileType.MOSTLY_Q6_K,
    "q5_k": LlamaFileType.MOSTLY_Q5_K_S, "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_1": LlamaFileType.MOSTLY_Q4_1, "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "iq4_xs": LlamaFileType.MOSTLY_IQ4_XS, "iq4_nl": LlamaFileType.MOSTLY_IQ4_NL,
    "q3_k": LlamaFileType.MOSTLY_Q3_K_S, "iq3_s": LlamaFileType.MOSTLY_IQ3_S,
    "iq3_xxs": LlamaFileType.MOSTLY_IQ3_XXS, "q2_k": LlamaFileType.MOSTLY_Q2_K,
    "iq2_s": LlamaFileType.MOSTLY_IQ2_S, "iq2_xs": LlamaFileType.MOSTLY_IQ2_XS,
    "iq2_xxs": LlamaFileType.MOSTLY_IQ2_XXS,
}


def quant_type(name: str) -> QuantType:
    """Look a type up by llama.cpp name (case-insensitive); unknown names raise PlanError."""
    q = QUANT_TYPES.get(name.strip().lower())
    if q is None:
        raise PlanError(f"unknown quantization type {name!r}: use one of {', '.join(_NAMES)}")
    return q


def parse_ladder(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """'q2_k,q3_k,...' -> validated names ordered by bits per weight (low to high)."""
    names = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(names) < 1:
        raise PlanError("the type ladder is empty: pass e.g. --ladder q2_k,q3_k,q4_k,q5_k,q6_k,q8_0")
    types = sorted({quant_type(n).name for n in names}, key=lambda n: (QUANT_TYPES[n].bpw, n))
    return tuple(types)


def legal_type(name: str, row_len: int) -> str:
    """The type a tensor with rows of ``row_len`` really gets when ``name`` is asked for."""
    q = QUANT_TYPES[name]
    if q.fits(row_len):
        return name
    fb = _FALLBACK.get(name, name)
    return fb if QUANT_TYPES[fb].fits(row_len) else "f16"


def file_type_for(name: str) -> LlamaFileType:
    return _FILE_TYPE[name]


# llama-quantize's whole-file presets ("mixes"), by the names it accepts: Q2_K, Q3_K_M, IQ4_XS ...
MIXES: tuple[str, ...] = tuple(n[len("MOSTLY_"):] for n in LlamaFileType.__members__
                               if n.startswith("MOSTLY_") and not n.endswith("_GUESSED"))
DEFAULT_BASELINES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K",
                     "Q8_0")
_MIX_NEEDS_IMATRIX = ("IQ1_", "IQ2_X", "IQ2_S", "IQ2_M", "Q2_K_S")


def parse_mixes(spec: str) -> tuple[str, ...]:
    """'q2_k,Q3_K_M' -> llama-quantize preset names; 'none' -> ()."""
    if spec.strip().lower() in ("", "none"):
        return ()
    out = []
    for name in (s.strip().upper() for s in spec.split(",") if s.strip()):
        if name not in MIXES or name in ("F16", "BF16"):
            raise PlanError(f"unknown llama-quantize type {name!r}: use e.g. "
                            f"{','.join(DEFAULT_BASELINES)} (or none)")
        if name not in out:
            out.append(name)
    return tuple(out)


def mix_needs_imatrix(name: str) -> bool:
    return name.startswith(_MIX_NEEDS_IMATRIX)
