"""The runtime floor: what llama.cpp's CPU matmul costs a quantized tensor by rounding its input.

A matmul with a quantized weight rounds its activations to int8 blocks (the weight type's
``vec_dot_type``: Q8_0/Q8_1, 32 wide, or Q8_K, 256 wide; :attr:`QuantType.act_block`). That
costs KLD however exactly the weights are stored. Its second-order estimate, per token,

    floor(t, block) = 1/2 * sum_j (g W)_j^2 * dx_j^2

(dx: the input's rounding error, g W: the gradient that reaches the input through this matmul
alone) is formed in the same backward pass as the Fisher (:mod:`lwq_gguf.score.fisher`) and added
to each type's damage (:mod:`lwq_gguf.score.sensitivity`). ``bench/act_floor.py`` sets it beside
single-tensor KLD measured in llama.cpp.
"""

from __future__ import annotations

from lwq_gguf.quant.types import QUANT_TYPES

# the activation blocks llama.cpp's CPU matmuls round to
ACT_BLOCKS = tuple(sorted({q.act_block for q in QUANT_TYPES.values() if q.act_block}))


def add_act_floor(acc: dict[int, float], x, gx, errors: dict | None = None) -> None:
    """Add to ``acc``, for each activation block, 1/2 sum over tokens and inputs of gx^2 dx^2: ``x`` (tokens x
    inputs) rounded to int8 in blocks of that many inputs, scale max|x| / 127 per block (ggml's
    quantize_row_q8_0 / q8_K); ``gx`` the gradient reaching the input through this matmul alone.
    Inputs past the last whole block count nothing (a type of that block does not fit such rows).
    Summed over tokens: :func:`per_token` divides by the token count, as for the Fisher.
    ``errors``: {block: dx^2} of this ``x`` where known (matmuls that share an input: q, k and v;
    gate and up), filled where not."""
    import torch

    g2 = gx.float().square()
    for b in ACT_BLOCKS:
        n = x.shape[1] - x.shape[1] % b
        e = errors.get(b) if errors is not None else None
        if e is None:
            xb = x[:, :n].float().reshape(x.shape[0], n // b, b)
            d = xb.abs().amax(-1, keepdim=True).div_(127).clamp_min_(1e-30)
            e = xb / d
            e.sub_(torch.round(e)).mul_(d).square_()  # the rounding error, squared
            if errors is not None:
                errors[b] = e
        acc[b] += 0.5 * float((g2[:, :n].reshape(e.shape) * e).sum())


def per_token(acc: dict[int, float], tokens: int) -> dict[int, float]:
    """An accumulated floor per token (what FisherTensor.floor holds)."""
    return {b: v / tokens for b, v in acc.items()}


def floor_hook(acc: dict[int, float], shared: dict):
    """A forward pre-hook for one matmul module that adds its floor over each backward to ``acc``:
    the module gets a view of its input, whose gradient is this matmul's part alone (g W; the
    input itself may feed several matmuls), so no extra matmul is formed. ``shared``: the input
    rounding errors of a layer's matmuls in one window, by input (the caller clears it after
    each backward), so that the matmuls that share an input round it once."""

    def pre(_mod, args):
        if not args[0].requires_grad:
            return None
        x = args[0].view_as(args[0])
        seen = args[0].detach().reshape(-1, x.shape[-1])
        # (keyed by the input's id, the input kept in the entry so that the id stays its own)
        errors = shared.setdefault(id(args[0]), (args[0], {}))[1]

        x.register_hook(lambda gx: add_act_floor(acc, seen, gx.reshape(-1, gx.shape[-1]),
                                                 errors))
        return (x, *args[1:])
    return pre
