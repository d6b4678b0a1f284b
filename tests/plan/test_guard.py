"""The plan set beside llama.cpp's own mixes (plan.guard, plan.mixes).

The choice on synthetic plans (no llama.cpp); the recipes, the mix's file and the measurement with
the pinned llama.cpp on a tiny generated model.
"""

import dataclasses

import pytest

from lwq_gguf.plan.guard import VERIFY_ABOVE, Budget, Guard, choose, measure
from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate_many
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.model.inventory import GGUFTensor, model_tensors, write_16bit
from lwq_gguf.model.load import open_model
from lwq_gguf.plan.config import Plan, PlanConfig
from lwq_gguf.plan.mixes import mix_plan, mix_recipes, parse_dry_run
from lwq_gguf.quant.gguf_file import read_back
from lwq_gguf.score.scores import default_calibration
from lwq_gguf.write.writer import WriteConfig, write_gguf

TENSORS = (GGUFTensor("token_embd.weight", (256, 1000), "f16"),
           GGUFTensor("blk.0.attn_q.weight", (256, 256), "f16"),
           GGUFTensor("blk.0.attn_norm.weight", (256,), "f32"))


def plan_of(types, avg_bits=5.0, ladder=()) -> Plan:
    cfg = PlanConfig(avg_bits=avg_bits, ladder=ladder)
    return Plan(cfg, TENSORS, (*types, "f32"), (0,), ("q4_k", "q6_k"))


# damage per type: q4_k 1.0, q5_k 0.5, q6_k 0.2 (each tensor)
DAMAGE = {t.name: {"q4_k": 1.0, "q5_k": 0.5, "q6_k": 0.2} for t in TENSORS[:2]}
NO_FILE = lambda p: 0  # noqa: E731 (an --avg-bits budget never asks for the file's bytes)


def test_no_mix_fits_keeps_the_plan():
    plan = plan_of(("q4_k", "q4_k"), avg_bits=4.5)
    g = choose(plan, {"Q6_K": {"token_embd.weight": "q6_k", "blk.0.attn_q.weight": "q6_k",
                               "blk.0.attn_norm.weight": "f32"}}, DAMAGE, Budget(avg_bits=4.5),
               NO_FILE)
    assert g.chosen is plan and g.mix is None and g.verify is None


def test_a_mix_estimated_no_worse_is_written_as_llama_quantize_writes_it():
    plan = plan_of(("q6_k", "q4_k"), avg_bits=6.6)  # 1.2 estimated
    recipe = {"token_embd.weight": "q5_k", "blk.0.attn_q.weight": "q6_k",
              "blk.0.attn_norm.weight": "f32"}  # 0.7, and smaller
    g = choose(plan, {"Q5_K_M": recipe}, DAMAGE, Budget(avg_bits=6.6), NO_FILE)
    assert g.chosen.mix == "Q5_K_M" and g.chosen.types == ("q5_k", "q6_k", "f32")
    assert g.chosen.config.encoder == "ggml" and g.verify is None
    assert (g.est_plan, g.est_mix) == (1.2, 0.7)


def test_a_clearly_better_plan_is_kept_and_a_close_one_is_measured():
    mix = {"token_embd.weight": "q5_k", "blk.0.attn_q.weight": "q5_k", "blk.0.attn_norm.weight": "f32"}
    better = plan_of(("q6_k", "q4_k"), avg_bits=6.6)  # 1.2 against the mix's 1.0: worse
    g = choose(better, {"Q5_K_M": mix}, DAMAGE, Budget(avg_bits=6.6), NO_FILE)
    assert g.chosen.mix == "Q5_K_M"
    damage = {**DAMAGE, "blk.0.attn_q.weight": {"q4_k": 0.6, "q5_k": 0.5, "q6_k": 0.2}}
    close = choose(better, {"Q5_K_M": mix}, damage, Budget(avg_bits=6.6), NO_FILE)  # .8 vs 1
    assert close.chosen is better and close.verify is not None and close.verify.mix == "Q5_K_M"
    assert 0.8 > VERIFY_ABOVE
    damage["blk.0.attn_q.weight"]["q4_k"] = 0.1  # .3 vs 1: clearly better, nothing measured
    clear = choose(better, {"Q5_K_M": mix}, damage, Budget(avg_bits=6.6), NO_FILE)
    assert clear.chosen is better and clear.verify is None and clear.mix == "Q5_K_M"


def test_a_mix_with_a_type_the_plan_may_not_use_or_over_the_budget_is_not_a_candidate():
    plan = plan_of(("q6_k", "q6_k"), avg_bits=6.6, ladder=("q4_k", "q6_k"))
    q5 = {"token_embd.weight": "q5_k", "blk.0.attn_q.weight": "q5_k", "blk.0.attn_norm.weight": "f32"}
    assert choose(plan, {"Q5_K_M": q5}, DAMAGE, Budget(avg_bits=6.6), NO_FILE).mix is None
    pinned = dataclasses.replace(plan, config=dataclasses.replace(
        plan.config, ladder=(), token_embedding_type="q6_k"))
    assert choose(pinned, {"Q5_K_M": q5}, DAMAGE, Budget(avg_bits=6.6), NO_FILE).mix is None
    q4 = {**q5, "token_embd.weight": "q4_k", "blk.0.attn_q.weight": "q4_k"}
    small = plan_of(("q4_k", "q4_k"), avg_bits=4.5)
    assert choose(small, {"Q5_K_M": q5}, DAMAGE, Budget(avg_bits=4.5), NO_FILE).mix is None
    # --size: the mix's file bytes decide
    sized = choose(small, {"Q5_K_M": q5, "Q4_K_M": q4}, DAMAGE, Budget(size=1000),
                   lambda p: 900 if p.mix == "Q4_K_M" else 1100)
    assert sized.mix == "Q4_K_M"


def test_parse_dry_run_lines():
    text = ("[   1/  12]                   output_norm.weight - [   64,     1,     1,     1], "
            "type =    f32, size =    0.000 MiB\n"
            "[   2/  12]                    token_embd.weight - [   64,  1000,     1,     1], "
            "type =    f16, size =    0.122 MiB ->     0.050 MiB (q6_K)\n"
            "llama_model_quantize_impl: model size  =     0.50 MiB (16.00 BPW)\n")
    assert parse_dry_run(text) == {"output_norm.weight": "f32", "token_embd.weight": "q6_k"}


@pytest.mark.slow
def test_recipe_and_file_are_llama_quantize_s_own(tiny, tmp_path):
    """--dry-run on the stub gives the types llama-quantize writes, and the mix plan's file is
    llama-quantize's file byte for byte (header, metadata, blocks)."""
    lc = find_llama_cpp()
    model_dir = tiny("llama", 2)
    model = open_model(model_dir)
    tensors = model_tensors(model)
    mixes = ("Q4_K_M", "Q3_K_S")
    recipes = mix_recipes(model, tensors, mixes)
    assert mix_recipes(model, tensors, mixes) == recipes  # (from the cache)
    base = tmp_path / "base.gguf"
    write_16bit(lc, model_dir, base)
    for mix in mixes:
        theirs = tmp_path / f"{mix}.gguf"
        run_tool([str(lc.tool("llama-quantize")), str(base), str(theirs), mix], what=mix)
        assert read_back(theirs).types == recipes[mix]
        plan = Plan(PlanConfig(avg_bits=4.0), tensors, tuple(recipes[mix][t.name] for t in tensors),
                    (0, 1), ("q3_k", "q6_k"))
        ours = write_gguf(lc, model_dir, mix_plan(plan, mix, recipes[mix]), None,
                          WriteConfig(output=tmp_path / f"ours-{mix}.gguf"), progress=False)
        assert ours.read_bytes() == theirs.read_bytes(), mix
    # the measurement keeps the file with the lower KLD on the calibration text
    plan = Plan(PlanConfig(avg_bits=4.0), tensors, tuple(recipes["Q4_K_M"][t.name] for t in tensors),
                (0, 1), ("q3_k", "q6_k"))
    g = Guard(plan, "Q3_K_S", 1.0, 1.2, verify=mix_plan(plan, "Q3_K_S", recipes["Q3_K_S"]))
    m = measure(g, (tmp_path / "Q4_K_M.gguf", tmp_path / "Q3_K_S.gguf"), base,
                default_calibration(), lc, progress=False)
    want = evaluate_many([tmp_path / "Q4_K_M.gguf", tmp_path / "Q3_K_S.gguf"],
                         default_calibration(), lc, EvalConfig(chunks=16),
                         base=base, progress=False)
    assert (m.kld_plan, m.kld_mix) == (want[0].kld_mean, want[1].kld_mean)
    assert (m.chosen.mix == "Q3_K_S") == (want[1].kld_mean < want[0].kld_mean)
    assert m.verify is None
