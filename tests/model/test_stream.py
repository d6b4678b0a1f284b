"""Streamed (one layer at a time) scoring equals the whole-model forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lwq_gguf.model.load import open_model
from lwq_gguf.score.sample import sample_labels
from lwq_gguf.score.layers import calibration_ids, lim_scores
from lwq_gguf.score.scores import ScoreConfig, default_calibration


def whole_model_lim(path, ids, seq_len):
    """The reference: LIM from forward hooks on the whole transformers model."""
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                              attn_implementation=open_model(path).arch.attention)
    lm.eval()
    sums, count = [0.0] * len(lm.model.layers), [0]

    def hook_for(i):
        def hook(_mod, args, kwargs, out):
            h_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            sums[i] += float(cos.double().sum())
            count[0] += cos.numel() if i == 0 else 0
        return hook

    for i, layer in enumerate(lm.model.layers):
        layer.register_forward_hook(hook_for(i), with_kwargs=True)
    with torch.no_grad():
        for s in range(0, len(ids), seq_len):
            lm.model(input_ids=torch.tensor([ids[s: s + seq_len]]), use_cache=False)
    return [-x / count[0] for x in sums]


@pytest.mark.parametrize("arch,tied", [
    ("llama", False), ("qwen3", True), ("mistral", False), ("gemma2", True), ("gemma3", True),
    ("phi3", False), ("mixtral", False), ("qwen2moe", False), ("qwen3moe", True), ("olmoe", False)])
def test_streamed_lim_equals_whole_model(tiny, arch, tied):
    path = tiny(arch, 3, tied=tied)
    model = open_model(path)
    # a full window and a short one
    cfg = ScoreConfig(calib_tokens=700, device="cpu", precision="fp32")
    ids = calibration_ids(model, cfg)
    streamed, device = lim_scores(model, cfg, ids, progress=False)
    assert device == "cpu" and len(streamed) == 3
    reference = whole_model_lim(path, ids, cfg.seq_len)
    assert max(abs(a - b) for a, b in zip(streamed, reference)) < 1e-4, (streamed, reference)


def whole_model_fisher(path, model, cfg):
    """The reference: Fisher diagonal + imatrix sums from one whole-model forward/backward."""
    from lwq_gguf.model.arch import gguf_names, merge_experts

    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                              attn_implementation=model.arch.attention).eval()
    names = gguf_names(lm, model.arch, model.n_layers)
    params = dict(lm.named_parameters())
    with torch.no_grad():
        for hf in names:
            params[hf].copy_(params[hf].to(torch.float16).float())
    ids = calibration_ids(model, cfg)
    windows = [ids[s: s + cfg.seq_len] for s in range(0, len(ids), cfg.seq_len)]
    fisher = {hf: torch.zeros_like(params[hf]) for hf in names}
    gen = torch.Generator().manual_seed(0)
    for w in windows:
        lm.zero_grad(set_to_none=True)
        logits = lm(input_ids=torch.tensor([w]), use_cache=False).logits[0]
        with torch.no_grad():
            y = sample_labels(torch.softmax(logits.float(), -1), gen)
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        with torch.no_grad():
            for hf in names:
                if params[hf].grad is not None:  # an expert no token went to has none
                    fisher[hf] += params[hf].grad ** 2
    n = sum(len(w) for w in windows)
    out, experts = {}, {}
    for hf, f in fisher.items():
        gname, e = names[hf]
        if e is None:
            out[gname] = (f / n).numpy()
        else:
            experts.setdefault(gname, {})[e] = (f / n).numpy()
    return {**out, **{g: merge_experts(parts) for g, parts in experts.items()}}


@pytest.mark.parametrize("arch,tied", [
    ("llama", False), ("qwen2", True), ("gemma2", True), ("gemma3", False), ("phi3", False),
    ("mixtral", False), ("qwen2moe", True), ("qwen3moe", False), ("olmoe", False)])
def test_streamed_fisher_equals_whole_model(tiny, arch, tied):
    import numpy as np

    from lwq_gguf.score.fisher import streamed_fisher

    path = tiny(arch, 2, tied=tied)
    model = open_model(path)
    cfg = ScoreConfig(calib_tokens=700, device="cpu", precision="fp32")
    run = streamed_fisher(model, cfg, progress=False)
    kept = {t.name: t for t in run.tensors}
    ref = whole_model_fisher(path, model, cfg)
    assert kept.keys() == ref.keys() and ("output.weight" in kept) != tied
    got = {}
    for name, f in ref.items():
        keep = kept[name].keep  # every row, but for an untied embedding its tokens' rows
        assert len(keep) == len(f) or (name == "token_embd.weight" and not tied), name
        assert np.abs(np.delete(f, keep, 0)).sum() == 0, name  # (the others': zero)
        got[name] = kept[name].fisher
        err = np.abs(got[name] - f[keep]).sum() / np.abs(f).sum()
        assert err < 1e-3, (name, err)
    assert run.tokens == 700 and set(run.imatrix.sums) >= {"blk.0.attn_output.weight",
                                                           "token_embd.weight" if tied else
                                                           "output.weight"}
    if model.arch.moe:  # each expert's imatrix row counts the tokens routed to it
        from tiny import N_EXPERTS, TOP_K

        counts = run.imatrix.counts["blk.1.ffn_down_exps.weight"]
        assert len(counts) == N_EXPERTS and counts.sum() == TOP_K * 700 and counts.min() > 0
        assert run.imatrix.sums["blk.1.ffn_down_exps.weight"].size == N_EXPERTS * 256
        assert got["blk.1.ffn_down_exps.weight"].shape == (N_EXPERTS * 256, 256)


@pytest.mark.parametrize("by_damage", [False, True])
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2moe", False)])
def test_fisher_on_kept_rows_equals_those_rows_of_the_whole(tiny, arch, tied, by_damage):
    """With max_rows, only a sample of rows is formed (the output and embedding without their
    full Fisher; merged experts from each expert's share of the sample), uniform or drawn by the
    rows' estimated damage; the sample's weights and Fisher are the whole run's rows."""
    import numpy as np

    from lwq_gguf.score.fisher import kept_rows, streamed_fisher
    from lwq_gguf.score.sample import RowSample

    model = open_model(tiny(arch, 2, tied=tied))
    cfg = ScoreConfig(calib_tokens=300, device="cpu", precision="fp32")
    whole = {t.name: t for t in streamed_fisher(model, cfg, progress=False).tensors}
    forty = RowSample(weights=None, vocab_rows=40, max_rows=40, by_damage=by_damage)
    part = {t.name: t for t in streamed_fisher(model, cfg, progress=False, sample=forty).tensors}
    assert part.keys() == whole.keys() and "token_embd.weight" in part
    sampled = 0
    for name, t in part.items():
        w = whole[name]
        keep = t.keep
        sampled += len(keep) < w.rows
        assert t.rows == w.rows and t.experts == w.experts and t.weight.shape[0] == len(keep), name
        layer = name.startswith("blk.")
        if not by_damage and not name.startswith("token_embd"):  # (the embedding: its tokens,
            np.testing.assert_array_equal(keep, kept_rows(w.rows, 40), err_msg=name)  # and more)
        elif layer and len(keep) < w.rows:  # drawn: as many, each counting for 1 / pi >= 1
            assert len(keep) == 40 and t.weights is not None and (t.weights >= 1 - 1e-9).all()
        assert len(t.row_weights) == len(keep) and (t.row_weights > 0).all()
        at = np.searchsorted(w.keep, keep)  # (the whole run's rows: all but an untied
        assert (w.keep[at] == keep).all(), name  # embedding's, which are its tokens)
        np.testing.assert_array_equal(t.weight, w.weight[at], err_msg=name)
        np.testing.assert_allclose(t.fisher, w.fisher[at], rtol=1e-4, atol=1e-12 +
                                   1e-5 * np.abs(w.fisher).max(), err_msg=name)
    assert sampled >= 3


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2moe", False)])
def test_rows_drawn_by_damage_estimate_a_tensor_far_better_than_a_uniform_sample(tiny, arch, tied):
    """Each sampled tensor's Fisher mass, summed over its kept rows as each counts: within 10 %
    of the whole run's when the rows are drawn by their estimated damage (the labels' rows of
    the output kept for certain), where a uniform sample of as many rows misses by far more."""
    import numpy as np

    from lwq_gguf.score.fisher import streamed_fisher
    from lwq_gguf.score.sample import RowSample

    model = open_model(tiny(arch, 2, tied=tied))
    cfg = ScoreConfig(calib_tokens=300, device="cpu", precision="fp32")
    whole = {t.name: float(t.fisher.sum()) for t in
             streamed_fisher(model, cfg, progress=False).tensors}
    worst = {}
    for by_damage in (True, False):
        sample = RowSample(weights=None, vocab_rows=40, max_rows=40, by_damage=by_damage)
        errs = [abs(float((t.fisher.astype(np.float64).sum(1) * t.row_weights).sum())
                    / whole[t.name] - 1)
                for t in streamed_fisher(model, cfg, progress=False, sample=sample).tensors
                if len(t.keep) < t.rows]
        assert len(errs) >= 8
        worst[by_damage] = max(errs)
    assert worst[True] < 0.1 and worst[False] > 2 * worst[True], worst


@pytest.mark.parametrize("n", [16, 700, 20000])
def test_prefix_tokenization_equals_whole_text(demo_models, tiny, n):
    from transformers import AutoTokenizer

    from lwq_gguf.score.layers import prefix_ids

    text = default_calibration().read_text(encoding="utf-8")
    for path in (demo_models[0], tiny("llama", 2)):
        tok = AutoTokenizer.from_pretrained(str(path))
        whole = tok(text[:400_000], add_special_tokens=False, verbose=False,
                    split_special_tokens=True)["input_ids"]
        assert prefix_ids(tok, text[:400_000], n) == whole[:n]
    short = "a short text\nof two lines"
    assert prefix_ids(tok, short, n) == tok(short, add_special_tokens=False,
                                            split_special_tokens=True)["input_ids"][:n]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_reading_rows_equals_reading_the_whole_tensor(tiny, dtype):
    """Weights are loaded in row blocks (bounded memory): each block is the whole's rows."""
    import numpy as np

    from lwq_gguf.model.load import read_tensor

    model = open_model(tiny("llama", 2, dtype=dtype))
    ref = next(r for r in model.tensors if r.name.endswith("embed_tokens.weight"))
    whole = read_tensor(ref)
    assert whole.dtype == np.float32 and whole.shape == tuple(ref.shape)
    n = ref.shape[0]
    for a, b in [(0, 1), (3, 17), (n - 5, n), (0, n)]:
        assert np.array_equal(read_tensor(ref, (a, b)), whole[a:b])


def test_gpu_placement_fills_the_gpus_in_layer_order(monkeypatch):
    """--device-map auto: accelerate's placement of the pieces over two (pretended) GPUs; what
    does not fit is left to be streamed."""
    from lwq_gguf.model.stream import auto_gpu_placement, gpu_placement
    from models.tiny import tiny_config

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(tiny_config("llama", 4, False, "bpe"), dtype=torch.float32)
    emb = lm.model.embed_tokens.weight.numel() * 4
    layer = sum(p.numel() for p in lm.model.layers[0].parameters()) * 4
    assert auto_gpu_placement(lm, 512, "cpu") == {}  # no GPU: everything streams
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # accelerate asks torch
    got = gpu_placement(lm, {0: 2 * emb + 2 * layer, 1: 2 * layer})
    assert got == {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0",
                   "model.layers.1": "cuda:0", "model.layers.2": "cuda:1",
                   "model.layers.3": "cuda:1"}  # norm + head: streamed
    everything = gpu_placement(lm, {0: 10 * emb, 1: 10 * emb})
    assert set(everything.values()) == {"cuda:0"} and len(everything) == 7


@pytest.mark.parametrize("tied", [False, True])
def test_resident_pieces_give_the_same_scores(tiny, monkeypatch, tied):
    """Pieces kept resident (as --device-map auto keeps them on GPUs; here on the CPU) are
    loaded once, and LIM and the Fisher come out the same as when every piece streams."""
    import numpy as np

    import lwq_gguf.model.stream as stream
    from lwq_gguf.score.fisher import streamed_fisher

    model = open_model(tiny("llama", 3, tied=tied))
    cfg = ScoreConfig(calib_tokens=300, device="cpu", precision="fp32")
    ids = calibration_ids(model, cfg)
    base_lim = lim_scores(model, cfg, ids, progress=False)[0]
    base = {t.name: t.fisher for t in streamed_fisher(model, cfg, progress=False).tensors}
    resident = {"model.embed_tokens": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                "lm_head": "cpu"}
    monkeypatch.setattr(stream, "auto_gpu_placement", lambda *_: dict(resident))
    loads = []
    real_to_empty = torch.nn.Module.to_empty
    monkeypatch.setattr(torch.nn.Module, "to_empty",
                        lambda self, **kw: loads.append(id(self)) or real_to_empty(self, **kw))
    mapped = ScoreConfig(calib_tokens=300, device="cpu", device_map="auto", precision="fp32")
    assert lim_scores(model, mapped, ids, progress=False)[0] == base_lim
    got = {t.name: t.fisher for t in streamed_fisher(model, mapped, progress=False).tensors}
    assert got.keys() == base.keys()
    for name, f in base.items():
        np.testing.assert_array_equal(got[name], f, err_msg=name)
    # LIM: embedding + layers 0-2; Fisher: embedding, layers 0-2, norm, head, then the backward
    # reloads only the streamed layers 2 and 0 (all streamed: 13 loads)
    assert len(loads) == 4 + 6 + 2


@pytest.mark.parametrize("arch", ["llama", "olmoe"])
def test_one_pass_gives_the_layer_scores(tiny, arch):
    """The scoring pass's LIM (on the 16-bit weights) and ZD (on the weights as read) equal the
    stand-alone measurements; the Fisher over fewer tokens is taken on windows spread evenly."""
    from lwq_gguf.score.fisher import streamed_fisher
    from lwq_gguf.score.sample import fisher_windows
    from lwq_gguf.score.layers import zd_scores

    model = open_model(tiny(arch, 3))
    cfg = ScoreConfig(calib_tokens=1100, fisher_tokens=300, seq_len=256, device="cpu",
                      precision="fp32")
    run = streamed_fisher(model, cfg, progress=False)
    lim = lim_scores(model, cfg, calibration_ids(model, cfg), progress=False)[0]
    assert max(abs(a - b) for a, b in zip(run.lim, lim)) < 1e-4, (run.lim, lim)
    assert run.zd == zd_scores(model, progress=False)
    assert run.tokens == 1100 and run.fisher_tokens == 512
    assert fisher_windows(5, 300, 256) == [0, 2] and fisher_windows(3, 4096, 512) == [0, 1, 2]
    assert len(list(run.tensors)) > 0


def q8_error(x, block):
    """x minus its int8 rounding in blocks of ``block`` (scale max|x|/127): written out plainly."""
    n = x.shape[1] - x.shape[1] % block
    err = torch.zeros_like(x)
    for s in range(0, n, block):
        b = x[:, s:s + block]
        d = b.abs().max(dim=1, keepdim=True).values / 127
        err[:, s:s + block] = b - torch.round(b / d) * d
    return err


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("gemma3", True),
                                       ("qwen2moe", False)])
def test_runtime_floor_equals_whole_model(tiny, arch, tied):
    """Per tensor, 1/2 sum (g W)^2 dx^2 / tokens from the streamed pass equals the same formed
    from a whole-model backward: each matmul's output gradient times its weight."""
    from lwq_gguf.model.arch import gguf_names
    from lwq_gguf.score.fisher import streamed_fisher
    from lwq_gguf.score.floor import ACT_BLOCKS

    path = tiny(arch, 2, tied=tied)
    model = open_model(path)
    cfg = ScoreConfig(calib_tokens=700, device="cpu", precision="fp32")
    got = {t.name: t.floor for t in streamed_fisher(model, cfg, progress=False).tensors}
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                              attn_implementation=model.arch.attention).eval()
    names = gguf_names(lm, model.arch, model.n_layers)
    with torch.no_grad():
        for hf, p in lm.named_parameters():
            if hf in names:
                p.copy_(p.to(torch.float16).float())
    ref: dict[str, dict[int, float]] = {}

    def hook_for(gname, mod):
        def hook(_m, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1])

            def on_grad(g):
                gx = g.reshape(-1, g.shape[-1]) @ mod.weight.detach()
                for b in ACT_BLOCKS:
                    v = 0.5 * float((gx.square() * q8_error(x, b).square()).sum())
                    ref.setdefault(gname, dict.fromkeys(ACT_BLOCKS, 0.0))[b] += v
            out.register_hook(on_grad)
        return hook

    for n, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear) and (n + ".weight" in names or n == "lm_head"):
            gname = "token_embd.weight" if n == "lm_head" and tied else names.get(
                n + ".weight", ("output.weight",))[0]
            m.register_forward_hook(hook_for(gname, m))
    ids = calibration_ids(model, cfg)
    gen = torch.Generator().manual_seed(0)
    for s in range(0, len(ids), cfg.seq_len):
        logits = lm(input_ids=torch.tensor([ids[s: s + cfg.seq_len]]), use_cache=False).logits[0]
        with torch.no_grad():
            y = sample_labels(torch.softmax(logits.float(), -1), gen)
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    assert set(got) == set(ref) | {"token_embd.weight"}
    for name, r in ref.items():
        for b in ACT_BLOCKS:
            want = r[b] / len(ids)
            assert want > 0 and abs(got[name][b] - want) <= 1e-3 * want, (name, b, got[name], want)
    if not tied:  # an embedding lookup rounds nothing
        assert got["token_embd.weight"] is None


@pytest.mark.parametrize("arch,tied", [("llama", False), ("gemma2", True)])
def test_bf16_matmuls_track_fp32(tiny, arch, tied):
    """The model pass in bf16 (as autocast runs it: fp32 norms, softmax and residual stream)
    draws the same labels and gives the Fisher, the imatrix and LIM of fp32 within a few
    percent, the runtime floor (a square of the gradients) within 10 %."""
    import numpy as np

    from lwq_gguf.score.fisher import streamed_fisher

    model = open_model(tiny(arch, 2, tied=tied))
    runs = {}
    for precision in ("bf16", "fp32"):
        run = streamed_fisher(model, ScoreConfig(calib_tokens=700, device="cpu",
                                                 precision=precision), progress=False)
        runs[precision] = (run, {t.name: t for t in run.tensors})
    (lo, lo_t), (hi, hi_t) = runs["bf16"], runs["fp32"]
    assert lo.precision == "bf16" and hi.precision == "fp32"
    for name, t in hi_t.items():
        f, g = t.fisher, lo_t[name].fisher
        assert np.abs(g - f).sum() / np.abs(f).sum() < 0.05, name  # (the same labels)
        for b, v in (t.floor or {}).items():
            assert abs(lo_t[name].floor[b] / v - 1) < 0.1, (name, b)
    for name, a in hi.imatrix.sums.items():
        assert np.abs(lo.imatrix.sums[name] - a).sum() / np.abs(a).sum() < 0.02, name
    assert np.allclose(lo.lim, hi.lim, atol=1e-2)


def test_sample_labels_follow_the_distribution():
    """Labels land on each token with its probability, never on a token of probability zero,
    repeat with the generator's seed, and do not move when the probabilities move a little."""

    p = torch.zeros(20000, 8, dtype=torch.float32)
    p[:, [1, 4, 7]] = torch.tensor([0.2, 0.5, 0.3])
    y = sample_labels(p, torch.Generator().manual_seed(0), rows=999)
    counts = torch.bincount(y, minlength=8).double() / len(y)
    assert counts[[0, 2, 3, 5, 6]].sum() == 0
    assert torch.allclose(counts[[1, 4, 7]], torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
                          atol=0.015)
    assert torch.equal(y, sample_labels(p, torch.Generator().manual_seed(0)))
    q = torch.softmax(torch.randn(512, 1000, generator=torch.Generator().manual_seed(1)), -1)
    nudged = q * (1 + 1e-3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(2)))
    a, b = (sample_labels(x, torch.Generator().manual_seed(3)) for x in (q, nudged))
    assert (a != b).float().mean() < 0.01
