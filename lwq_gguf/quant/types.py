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
    # what llama.cpp writes for a row the block does not divide (tensor_type_fallback at the pin;
    # F16 where that does not fit either), or None where llama-quantize refuses the tensor
    fallback: str | None
    file_type: LlamaFileType  # the pure llama.cpp file type that best labels a file of this type
    # the int8 blocks llama.cpp's CPU backend rounds a matmul's activations to for this type
    # (its vec_dot_type: Q8_0/Q8_1 32 weights, Q8_K 256); 0: not rounded (a float type)
    act_block: int = 0

    @property
    def bpw(self) -> float:
        """Bits per weight of a tensor stored in this type."""
        return self.type_size * 8 / self.block

    def fits(self, row_len: int) -> bool:
        """True when a row of ``row_len`` weights (ggml ne0) can be stored in this type."""
        return row_len % self.block == 0


# One row per type a plan may use - every type llama-quantize writes, the float types for tensors
# kept unquantized - high to low bits per weight: its llama.cpp name, whether llama.cpp refuses
# it without an importance matrix (tensor_requires_imatrix at the pin; ggml itself aborts on
# iq2_xxs, iq2_xs and iq1_s: lwq-gguf offers them only where it has one), its fallback ("" for
# none: F16 where the row does not fit; None: refused) and its file type (gguf's LlamaFileType).
# Block sizes and bytes come from gguf.GGML_QUANT_SIZES.
_ROWS = (
    ("f32", False, "", "ALL_F32"), ("f16", False, "", "MOSTLY_F16"),
    ("bf16", False, "", "MOSTLY_BF16"), ("q8_0", False, "", "MOSTLY_Q8_0"),
    ("q6_k", False, "q8_0", "MOSTLY_Q6_K"), ("q5_1", False, "", "MOSTLY_Q5_1"),
    ("q5_k", False, "q5_1", "MOSTLY_Q5_K_S"), ("q5_0", False, "", "MOSTLY_Q5_0"),
    ("q4_1", False, "", "MOSTLY_Q4_1"), ("nvfp4", False, None, "MOSTLY_NVFP4"),
    ("q4_k", False, "q5_0", "MOSTLY_Q4_K_S"), ("q4_0", False, "", "MOSTLY_Q4_0"),
    ("iq4_nl", False, "", "MOSTLY_IQ4_NL"), ("iq4_xs", False, "iq4_nl", "MOSTLY_IQ4_XS"),
    ("mxfp4", False, "", "MOSTLY_MXFP4_MOE"), ("q3_k", False, "q4_0", "MOSTLY_Q3_K_S"),
    ("iq3_s", False, "iq4_nl", "MOSTLY_IQ3_S"), ("iq3_xxs", True, "iq4_nl", "MOSTLY_IQ3_XXS"),
    ("q2_k", False, "q4_0", "MOSTLY_Q2_K"), ("iq2_s", True, "iq4_nl", "MOSTLY_IQ2_S"),
    ("iq2_xs", True, "iq4_nl", "MOSTLY_IQ2_XS"), ("q2_0", False, "q4_0", "MOSTLY_Q2_0"),
    ("iq2_xxs", True, "iq4_nl", "MOSTLY_IQ2_XXS"), ("tq2_0", False, "q4_0", "MOSTLY_TQ2_0"),
    ("iq1_m", True, "iq4_nl", "MOSTLY_IQ1_M"), ("tq1_0", False, "q4_0", "MOSTLY_TQ1_0"),
    ("iq1_s", True, "iq4_nl", "MOSTLY_IQ1_S"), ("q1_0", False, None, "MOSTLY_Q1_0"),
)


# The type each one's activations are rounded to on the CPU (type_traits_cpu[].vec_dot_type in
# ggml-cpu.c at the pin): the K-quants, i-quants but IQ4_NL, and the ternary types take Q8_K
_VEC_DOT = {"q4_1": "q8_1", "q5_1": "q8_1",
            **dict.fromkeys(("q8_0", "q5_0", "q4_0", "iq4_nl", "mxfp4", "nvfp4", "q2_0", "q1_0"),
                            "q8_0")}


# the float types (kept unquantized), and the types ggml itself refuses to quantize without an
# importance matrix (ggml_quantize_requires_imatrix at the pin: it aborts)
FLOAT_TYPES = ("f32", "f16", "bf16")
GGML_NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs", "iq1_s")


def _act_block(name: str) -> int:
    if name in FLOAT_TYPES:
        return 0
    return GGML_QUANT_SIZES[GGMLQuantizationType[_VEC_DOT.get(name, "q8_k").upper()]][0]


def _build() -> dict[str, QuantType]:
    table = {}
    for name, imatrix, fallback, file_type in _ROWS:
        g = GGMLQuantizationType[name.upper()]
        block, size = GGML_QUANT_SIZES[g]
        table[name] = QuantType(name, g, block, size, imatrix,
                                name if fallback == "" else fallback, LlamaFileType[file_type],
                                _act_block(name))
    return table


QUANT_TYPES: dict[str, QuantType] = _build()

# the paper's strategies (lim, zd, random) walk K-quants; so does --ladder k, for backends that
# run K-quants faster than i-quants
K_LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
DEFAULT_LADDER = K_LADDER
# --ladder all: every type llama-quantize writes but the ternary ones (no CUDA kernels at the
# pin, and meant for ternary-trained models): the round-to-nearest types are exact on weights
# that already sit on their grid (QAT or re-exported models), the i-quants and FP4 types cost
# fewer bytes for the same error on most others; each is kept only where it wins
ALL_LADDER = tuple(sorted((n for n in QUANT_TYPES if n not in (*FLOAT_TYPES, "tq1_0", "tq2_0")),
                          key=lambda n: (QUANT_TYPES[n].bpw, n)))
# Types whose estimated damage is not to be trusted on trained weights: measured one tensor at a
# time in llama.cpp (bench/truth.py, Gemma 3 270M), against the same tensor's other types the
# sign-like Q1_0 (1 bit) costs a median 1.8x (up to 5.8x) the KLD its second-order estimate
# says, Q2_0 (2 bits) 1.15x (up to 2.2x), where the i-quants of the same sizes (IQ1_S ...
# IQ2_S) sit at 0.86-1.02x: the planner would pick them where they lose. Offered with
# --ladder all (or by name) only.
UNTRUSTED = ("q1_0", "q2_0")
# --strategy auto's default (--ladder default): all of them but those
AUTO_LADDER = tuple(n for n in ALL_LADDER if n not in UNTRUSTED)
LADDER_PRESETS = {"k": K_LADDER, "default": AUTO_LADDER, "all": ALL_LADDER}


# who encodes the blocks (lwq_gguf.quant.encoder): lwq-gguf's own Q4_K + ggml's other types, or
# ggml's for all (llama-quantize's bytes). The one default is the first.
ENCODERS = ("lwq", "ggml")
DEFAULT_ENCODER = ENCODERS[0]


def default_ladder(strategy: str) -> tuple[str, ...]:
    return AUTO_LADDER if strategy == "auto" else DEFAULT_LADDER

def quant_type(name: str) -> QuantType:
    """Look a type up by llama.cpp name (case-insensitive); unknown names raise PlanError."""
    q = QUANT_TYPES.get(name.strip().lower())
    if q is None:
        raise PlanError(f"unknown quantization type {name!r}: use one of {', '.join(QUANT_TYPES)}")
    return q


def parse_ladder(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """'q2_k,q3_k,...' (or a preset: k, default, all) -> validated names ordered by bits per
    weight."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(names) < 1:
        raise PlanError("the type ladder is empty: pass e.g. --ladder q2_k,q3_k,q4_k,q5_k,q6_k,q8_0 "
                        "or a preset (k, default, all)")
    names = [m for n in names for m in LADDER_PRESETS.get(n.lower(), (n,))]
    types = sorted({quant_type(n).name for n in names}, key=lambda n: (QUANT_TYPES[n].bpw, n))
    return tuple(types)


def usable_ladder(ladder: tuple[str, ...], imatrix: bool) -> tuple[str, ...]:
    """The ladder's types that can be written: those that need an importance matrix only with one."""
    return tuple(q for q in ladder if imatrix or not QUANT_TYPES[q].needs_imatrix)


def has_fallback(name: str) -> bool:
    """False for the types llama-quantize refuses on a row they do not fit."""
    return QUANT_TYPES[name].fallback is not None


def legal_type(name: str, row_len: int) -> str | None:
    """The type a tensor with rows of ``row_len`` really gets when ``name`` is asked for (llama.cpp's
    fallback), or None where llama-quantize refuses (a 128- or 64-block type with no fallback)."""
    q = QUANT_TYPES[name]
    if q.fits(row_len):
        return name
    if q.fallback is None:
        return None
    return q.fallback if QUANT_TYPES[q.fallback].fits(row_len) else "f16"


def legal_types(ladder: tuple[str, ...], row_len: int) -> list[str]:
    """The distinct types the ladder's types become on rows of ``row_len`` (sorted by name)."""
    return sorted({ty for q in ladder if (ty := legal_type(q, row_len)) is not None})


def file_type_for(name: str) -> LlamaFileType:
    return QUANT_TYPES[name].file_type


# llama-quantize's whole-file presets ("mixes"), by the names it accepts: Q2_K, Q3_K_M, IQ4_XS ...
MIXES: tuple[str, ...] = tuple(n[len("MOSTLY_"):] for n in LlamaFileType.__members__
                               if n.startswith("MOSTLY_") and not n.endswith("_GUESSED"))
DEFAULT_BASELINES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K",
                     "Q8_0")
# the i-quant mixes users download (IQ2_M and IQ3_XXS need an imatrix): compared by default
# whenever there is one
IQ_BASELINES = ("IQ2_M", "IQ3_XXS", "IQ3_M", "IQ4_XS")
_MIX_NEEDS_IMATRIX = ("IQ1_", "IQ2_", "IQ3_XXS", "IQ3_XS", "Q2_K_S")


def default_baselines(imatrix: bool) -> tuple[str, ...]:
    """compare's mixes when none are named: the K-quant ones, and the i-quant ones with an imatrix."""
    return DEFAULT_BASELINES + (IQ_BASELINES if imatrix else ())


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
