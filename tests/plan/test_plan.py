"""Planning on synthetic tensor inventories (shapes of the demo models); no llama.cpp needed."""

import dataclasses
import json
import random
import re

import pytest

from conftest import KINDS, follows_ranking
from lwq_gguf.errors import PlanError
from lwq_gguf.plan.plan import Plan, PlanConfig, check_reach, make_plan, parse_override
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.quant.tensors import tensor_nbytes
from lwq_gguf.plan.knapsack import min_damage
from lwq_gguf.quant.types import AUTO_LADDER, QUANT_TYPES, legal_type
from lwq_gguf.report import plan_summary

def inventory(n_layers=30, hidden=768, ffn=1536, kv=192, vocab=49152, tied=True):
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden, kv), "attn_v": (hidden, kv),
              "attn_output": (hidden, hidden), "ffn_gate": (hidden, ffn), "ffn_up": (hidden, ffn),
              "ffn_down": (ffn, hidden)}
    t = [GGUFTensor("token_embd.weight", (hidden, vocab), "f16")]
    for i in range(n_layers):
        t.append(GGUFTensor(f"blk.{i}.attn_norm.weight", (hidden,), "f32"))
        t += [GGUFTensor(f"blk.{i}.{k}.weight", shapes[k], "f16") for k in KINDS]
        t.append(GGUFTensor(f"blk.{i}.ffn_norm.weight", (hidden,), "f32"))
    t.append(GGUFTensor("output_norm.weight", (hidden,), "f32"))
    if not tied:
        t.append(GGUFTensor("output.weight", (hidden, vocab), "f16"))
    return t


LIM = [round(random.Random(1).uniform(-1, 0), 4) for _ in range(30)]
ZD = [round(random.Random(2).uniform(0.1, 0.2), 4) for _ in range(30)]


@pytest.mark.parametrize("target", [3.0, 3.5, 4.25, 5.0, 6.0, 7.5])
def test_k256_shapes_hit_every_target_and_follow_lim(target):
    plan = make_plan(inventory(), 30, PlanConfig(avg_bits=target, strategy="lim"), lim=LIM, zd=ZD)
    assert abs(plan.bpw() - target) <= 0.02
    follows_ranking(plan, LIM)
    assert plan.layer_order[0] == max(range(30), key=lambda i: LIM[i])


def test_zd_and_random_strategies():
    zd = make_plan(inventory(), 30, PlanConfig(avg_bits=4.0, strategy="zd"), lim=LIM, zd=ZD)
    follows_ranking(zd, ZD)
    r1 = make_plan(inventory(), 30, PlanConfig(avg_bits=4.0, strategy="random", seed=1))
    r1b = make_plan(inventory(), 30, PlanConfig(avg_bits=4.0, strategy="random", seed=1))
    r2 = make_plan(inventory(), 30, PlanConfig(avg_bits=4.0, strategy="random", seed=2))
    assert r1 == r1b and r1.layer_order != r2.layer_order
    assert abs(r2.bpw() - 4.0) <= 0.02


def test_bpw_counts_real_bytes_of_every_tensor():
    plan = make_plan(inventory(n_layers=4), 4, PlanConfig(avg_bits=4.5, strategy="lim"), lim=LIM[:4])
    bits = sum(tensor_nbytes(ty, t.shape) * 8 for t, ty in zip(plan.tensors, plan.types))
    assert plan.bpw() == bits / sum(t.numel for t in plan.tensors)
    assert all(plan.type_of(t.name) == "f32" for t in plan.tensors if "norm" in t.name)
    assert plan.bpw(layers_only=True) != plan.bpw()


def test_unaligned_rows_get_types_they_can_take():
    inv = inventory(hidden=576, kv=192)
    with pytest.raises(PlanError, match=r"outside .* reaches on this model: 4\.\d+ to 8\.\d+ BPW"):
        make_plan(inv, 30, PlanConfig(avg_bits=3.5, strategy="lim"), lim=LIM)
    for target in (4.5, 5.0, 6.0):
        plan = make_plan(inv, 30, PlanConfig(avg_bits=target, strategy="lim"), lim=LIM)
        assert abs(plan.bpw() - target) <= 0.02
        for t, ty in zip(plan.tensors, plan.types):
            assert QUANT_TYPES[ty].fits(t.shape[0]), (t.name, ty)
        assert {plan.type_of(f"blk.{i}.attn_q.weight") for i in range(30)} <= {"q4_0", "q5_0", "q5_1", "q8_0"}


def test_out_of_range_and_bad_names():
    with pytest.raises(PlanError, match=r"--avg-bits 2 is outside .* 2\.\d+ to 8\.\d+ BPW"):
        make_plan(inventory(), 30, PlanConfig(avg_bits=2.0, strategy="lim"), lim=LIM)
    with pytest.raises(PlanError, match="--avg-bits 9 is outside"):
        make_plan(inventory(), 30, PlanConfig(avg_bits=9.0, strategy="lim"), lim=LIM)
    with pytest.raises(PlanError, match="unknown quantization type 'q9_k'"):
        PlanConfig(avg_bits=4.0, ladder=("q2_k", "q9_k"))
    with pytest.raises(PlanError, match="unknown strategy"):
        PlanConfig(avg_bits=4.0, strategy="magic")
    with pytest.raises(PlanError, match="needs LIM scores"):
        make_plan(inventory(), 30, PlanConfig(avg_bits=4.0, strategy="lim"))


def test_default_ladder_follows_the_strategy_and_plans_record_it():
    from lwq_gguf.quant.types import AUTO_LADDER, DEFAULT_LADDER

    auto, lim = PlanConfig(avg_bits=4.0), PlanConfig(avg_bits=4.0, strategy="lim")
    assert set(auto.ladder) == set(AUTO_LADDER) and {"q4_0", "q4_1", "q5_0", "q5_1"} <= set(auto.ladder)
    assert lim.ladder == DEFAULT_LADDER  # the paper's strategies: K-quants only
    assert PlanConfig(avg_bits=4.0, ladder=("q8_0", "q4_k")).ladder == ("q4_k", "q8_0")  # as given, sorted
    plan = make_plan(inventory(), 30, lim, lim=LIM)
    again = Plan.from_json(plan.to_json())
    assert again.config == lim and again.config.encoder == "lwq"
    old = json.loads(plan.to_json())
    del old["config"]["encoder"]  # a plan written before encoders existed: ggml's bytes
    assert Plan.from_json(json.dumps(old)).config.encoder == "ggml"


def test_embedding_policy_and_overrides_are_respected_within_budget():
    cfg = PlanConfig(avg_bits=4.0, token_embedding_type="q6_k", overrides=(parse_override("attn_v=q8_0"),),
                     strategy="lim")
    plan = make_plan(inventory(), 30, cfg, lim=LIM)
    assert plan.type_of("token_embd.weight") == "q6_k"
    assert all(plan.type_of(f"blk.{i}.attn_v.weight") == "q8_0" for i in range(30))
    assert abs(plan.bpw() - 4.0) <= 0.02
    auto = make_plan(inventory(tied=False), 30, PlanConfig(avg_bits=5.0, strategy="lim"), lim=LIM)
    assert auto.type_of("output.weight") in ("q5_k", "q6_k")  # planned first: the upper level
    with pytest.raises(PlanError, match="REGEX=TYPE"):
        parse_override("attn_v")


def test_plan_json_round_trip_and_tensor_type_file():
    plan = make_plan(inventory(n_layers=6), 6, PlanConfig(avg_bits=3.7, strategy="random", seed=3))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    lines = plan.tensor_type_file().splitlines()
    quantizable = [t for t in plan.tensors if t.quantizable]
    assert len(lines) == len(quantizable)
    names = [t.name for t in plan.tensors]
    for line, t in zip(lines, quantizable):
        pattern, ty = line.split("=")
        assert [n for n in names if re.search(pattern, n)] == [t.name]
        assert ty == plan.type_of(t.name)
    # every PlanConfig field round-trips (the JSON is read generically, not field by field)
    full = PlanConfig(avg_bits=4.25, ladder=("q4_k", "q8_0"), strategy="auto", seed=7,
                      token_embedding_type="q6_k", output_tensor_type="q8_0",
                      overrides=(("attn_v", "q8_0"), ("ffn_down", "q6_k")), encoder="ggml",
                      dense_bits=5.5)
    doc = json.loads(plan.to_json())
    doc["config"] = json.loads(json.dumps(dataclasses.asdict(full)))
    assert Plan.from_json(json.dumps(doc)).config == full
    with pytest.raises(PlanError, match="corrupt plan"):
        Plan.from_json('{"format": "lwq-gguf.plan", "version": 1}')
    with pytest.raises(PlanError, match="not a version-1"):
        Plan.from_json('{"format": "x"}')


def synthetic_damage(tensors, seed=0):
    """damage = sensitivity * elements * 4^-bpw: halving the step size quarters the error; the
    round-to-nearest types (q4_0 ... q5_1) 1.3x worse than a K-quant of their size."""
    rnd = random.Random(seed)
    out = {}
    for t in tensors:
        if t.quantizable:
            w = rnd.uniform(0.1, 10) * (5 if t.layer is None else 1)
            out[t.name] = {}
            for q in AUTO_LADDER:
                ty = legal_type(q, t.shape[0])
                if ty is None:
                    continue
                out[t.name][ty] = (w * t.numel * 4 ** -QUANT_TYPES[ty].bpw
                                   * (1 if ty.endswith("_k") or ty == "q8_0" else 1.3))
    return out


def total_damage(plan, damage):
    return sum(damage[t.name][ty] for t, ty in zip(plan.tensors, plan.types) if t.quantizable)


@pytest.mark.parametrize("target", [3.0, 3.7, 4.4, 5.5])
def test_auto_strategy_beats_two_level_plans_within_budget(target):
    inv = inventory(tied=False)
    damage = synthetic_damage(inv)
    auto = make_plan(inv, 30, PlanConfig(avg_bits=target), lim=LIM, damage=damage)
    assert auto.config.strategy == "auto"
    assert target - 0.02 <= auto.bpw() <= target + 1e-9  # never above the target here
    for strategy in ("lim", "zd", "random"):
        other = make_plan(inv, 30, PlanConfig(avg_bits=target, strategy=strategy), lim=LIM, zd=ZD)
        assert total_damage(auto, damage) <= total_damage(other, damage) * (1 + 1e-9)
        if other.bpw() <= auto.bpw():
            assert total_damage(auto, damage) < total_damage(other, damage)
    # the embedding and output are in the same budget: a fixed type is respected
    if target > 4:
        fixed = make_plan(inv, 30, PlanConfig(avg_bits=target, output_tensor_type="q8_0"), damage=damage)
        assert fixed.type_of("output.weight") == "q8_0" and abs(fixed.bpw() - target) <= 0.02


def test_more_bytes_never_buy_more_damage():
    """A model like Gemma 3 270M rebuilt from a Q4_K_M file: layers on a Q5_0 grid (no damage
    from q5_0 up), a tied 640-wide embedding whose next step (q5_1 -> q8_0) is large. A target in
    that gap gets the least-damage file below it, not a file that lands nearer the target by
    crushing the layers: the estimated damage never grows with the target."""
    inv = inventory(n_layers=6, hidden=640, ffn=2048, kv=256, vocab=262144)
    damage = synthetic_damage(inv)
    for t in inv:
        if t.quantizable and t.layer is not None:
            damage[t.name] = {ty: (0.0 if QUANT_TYPES[ty].bpw >= QUANT_TYPES["q5_0"].bpw else d)
                              for ty, d in damage[t.name].items()}
    last, gaps = float("inf"), 0
    for target in [4.25 + 0.25 * k for k in range(16)]:
        plan = make_plan(inv, 6, PlanConfig(avg_bits=target), damage=damage)
        assert plan.bpw() <= target + 0.02
        assert total_damage(plan, damage) <= last * (1 + 1e-9), target
        last = total_damage(plan, damage)
        gaps += plan.bpw() < target - 0.02
        # and the summary says why the file is smaller
        assert ("smaller than the target" in plan_summary(plan)) == (plan.bpw() < target - 0.02)
    assert gaps  # the gap is there: some targets are answered by a smaller file


def test_auto_strategy_needs_sensitivity_for_every_type():
    inv = inventory()
    with pytest.raises(PlanError, match="sensitivity analysis"):
        make_plan(inv, 30, PlanConfig(avg_bits=4.0), lim=LIM)
    damage = synthetic_damage(inv)
    del damage["blk.3.attn_v.weight"]["q6_k"]
    with pytest.raises(PlanError, match="blk.3.attn_v.weight"):
        make_plan(inv, 30, PlanConfig(avg_bits=4.0), lim=LIM, damage=damage)


def test_types_that_need_an_imatrix_are_planned_only_where_measured():
    """With --imatrix none the sensitivity tables hold no damage for the types llama.cpp refuses
    without one (IQ3_XXS, IQ2_*, IQ1_*): the planner leaves them out instead of failing."""
    inv = inventory()
    damage = synthetic_damage(inv)
    no_im = {n: {ty: d for ty, d in row.items() if not QUANT_TYPES[ty].needs_imatrix}
             for n, row in damage.items()}
    plain = make_plan(inv, 30, PlanConfig(avg_bits=3.0), damage=no_im)
    assert not any(QUANT_TYPES[ty].needs_imatrix for ty in plain.types)
    rich = make_plan(inv, 30, PlanConfig(avg_bits=3.0), damage=damage)
    assert any(QUANT_TYPES[ty].needs_imatrix for ty in rich.types)
    assert total_damage(rich, damage) < total_damage(plain, damage)
    assert abs(make_plan(inv, 30, PlanConfig(avg_bits=2.0), damage=damage).bpw() - 2.0) <= 0.02
    # a ladder of such types alone cannot be written without an imatrix: said before scoring
    cfg = PlanConfig(avg_bits=2.2, ladder=("iq2_xxs", "q2_k", "q4_k", "q8_0"))
    check_reach(inv, cfg, imatrix=True)
    with pytest.raises(PlanError, match="outside what ladder"):
        check_reach(inv, cfg, imatrix=False)
    with pytest.raises(PlanError, match="iq2_xxs need an importance matrix"):
        PlanConfig(avg_bits=3.0, strategy="lim", ladder=("q2_k", "iq2_xxs"))
    # a fixed type a row cannot hold, with no fallback in llama.cpp: refused by name
    with pytest.raises(PlanError, match="blk.0.ffn_down.weight has rows of 1568 weights, which q1_0"):
        make_plan(inventory(hidden=576, ffn=1568), 30,
                  PlanConfig(avg_bits=4.5, overrides=(("ffn_down", "q1_0"),)), damage=damage)


def test_knapsack_is_exact_on_small_problems():
    import itertools

    rnd = random.Random(7)
    for _ in range(300):
        opts = [[(rnd.randint(1, 50), rnd.random()) for _ in range(rnd.randint(1, 3))]
                for _ in range(rnd.randint(1, 5))]
        budget = rnd.randint(5, 150)
        floor = rnd.randint(0, budget)
        got = min_damage(opts, budget, floor, resolution=1 << 12)
        combos = [(sum(opts[i][j][1] for i, j in enumerate(c)), sum(opts[i][j][0] for i, j in
                   enumerate(c))) for c in itertools.product(*[range(len(o)) for o in opts])]
        if not any(b <= budget for _, b in combos):
            assert got is None
            continue
        cost = sum(opts[i][j][0] for i, j in enumerate(got))
        dmg = sum(opts[i][j][1] for i, j in enumerate(got))
        assert cost <= budget
        inside = [d for d, b in combos if floor <= b <= budget]
        if inside:
            assert cost >= floor and dmg <= min(inside) + 1e-9


def test_split_knapsack_is_exact_on_small_problems():
    """Least damage with the total within ``budget`` and the dense items within ``dense``."""
    import itertools

    from lwq_gguf.plan.knapsack import min_damage_split

    rnd = random.Random(11)
    for _ in range(300):
        n = rnd.randint(2, 6)
        opts = [sorted((rnd.randint(1, 40), rnd.random()) for _ in range(rnd.randint(1, 3)))
                for _ in range(n)]
        dense = [rnd.random() < 0.5 for _ in range(n)]
        budget, limit = rnd.randint(5, 150), rnd.randint(0, 80)
        floor = rnd.choice([0, rnd.randint(0, budget)])
        got = min_damage_split(opts, dense, budget, limit, floor, resolution=1 << 12)
        ok, inside = [], []
        for c in itertools.product(*[range(len(o)) for o in opts]):
            cost = sum(opts[i][j][0] for i, j in enumerate(c))
            dcost = sum(opts[i][j][0] for i, j in enumerate(c) if dense[i])
            if cost <= budget and dcost <= limit:
                ok.append(sum(opts[i][j][1] for i, j in enumerate(c)))
                if cost >= floor:
                    inside.append(ok[-1])
        if not ok:
            assert got is None or sum(opts[i][j][0] for i, j in enumerate(got) if dense[i]) > limit
            continue
        assert got is not None
        cost = sum(opts[i][j][0] for i, j in enumerate(got))
        dmg = sum(opts[i][j][1] for i, j in enumerate(got))
        assert cost <= budget
        assert sum(opts[i][j][0] for i, j in enumerate(got) if dense[i]) <= limit
        if inside:  # the floor is met when some choice meets it, at the least damage there
            assert cost >= floor and dmg <= min(inside) + 1e-9
        else:
            assert dmg <= min(ok) + 1e-9


def moe_inventory(n_layers=8, hidden=768, experts=8, ffn=512, vocab=49152):
    t = [GGUFTensor("token_embd.weight", (hidden, vocab), "f16"),
         GGUFTensor("output.weight", (hidden, vocab), "f16")]
    for i in range(n_layers):
        t += [GGUFTensor(f"blk.{i}.attn_norm.weight", (hidden,), "f32"),
              GGUFTensor(f"blk.{i}.ffn_gate_inp.weight", (hidden, experts), "f32")]
        t += [GGUFTensor(f"blk.{i}.{k}.weight", (hidden, hidden), "f16")
              for k in ("attn_q", "attn_k", "attn_v", "attn_output")]
        t += [GGUFTensor(f"blk.{i}.ffn_{k}_exps.weight", (hidden, ffn, experts), "f16")
              for k in ("gate", "up")]
        t.append(GGUFTensor(f"blk.{i}.ffn_down_exps.weight", (ffn, hidden, experts), "f16"))
    return t


def test_dense_size_bounds_the_non_expert_part():
    from lwq_gguf.plan.budget import dense_budget, is_dense, parse_size

    inv = moe_inventory()
    damage = synthetic_damage(inv)
    free = make_plan(inv, 8, PlanConfig(avg_bits=4.0), damage=damage)
    assert not all(is_dense(t) for t in inv) and free.config.dense_bytes is None
    limit = int(free.dense_nbytes * 0.8)
    split = make_plan(inv, 8, PlanConfig(avg_bits=4.0, dense_bytes=limit), damage=damage)
    assert split.dense_nbytes <= limit and abs(split.bpw() - 4.0) <= 0.02
    assert split.nbytes - split.dense_nbytes > free.nbytes - free.dense_nbytes  # experts got more
    assert total_damage(split, damage) >= total_damage(free, damage)  # a constraint costs
    bits = make_plan(inv, 8, PlanConfig(avg_bits=4.0, dense_bits=3.5), damage=damage)
    assert bits.dense_nbytes <= dense_budget(inv, None, 3.5) and abs(bits.bpw() - 4.0) <= 0.02
    assert Plan.from_json(split.to_json()).config.dense_bytes == limit
    with pytest.raises(PlanError, match="non-expert part cannot fit in 1.0 MiB"):
        make_plan(inv, 8, PlanConfig(avg_bits=4.0, dense_bytes=1 << 20), damage=damage)
    with pytest.raises(PlanError, match="reaches .* to .* BPW"):
        make_plan(inv, 8, PlanConfig(avg_bits=7.5, dense_bits=2.7), damage=damage)
    with pytest.raises(PlanError, match="no routed experts"):
        make_plan(inventory(), 30, PlanConfig(avg_bits=4.0, dense_bits=4),
                  damage=synthetic_damage(inventory()))
    with pytest.raises(PlanError, match="give one"):
        PlanConfig(avg_bits=4.0, dense_bits=4, dense_bytes=1000)
    assert parse_size("3.5GiB") == int(3.5 * 2**30) and parse_size("800MB") == 800_000_000
    for bad in ("3.5 parsecs", "-1G", ""):
        with pytest.raises(PlanError, match="--dense-size"):
            parse_size(bad)
