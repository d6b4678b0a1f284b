"""One list of metrics: eval's table, compare's and the card's columns come from it."""

from lwq_gguf.evaluate.metrics import METRICS, metrics
from lwq_gguf.evaluate.perplexity import EvalResult
from lwq_gguf.report import COMPARE_HEADERS, eval_rows


def test_metrics_format_values_errors_and_missing_ones():
    kld, top, ppl = metrics("kld_mean", "same_top_pct", "ppl")
    assert kld.fmt(0.0123456, 0.0001) == "0.01235 ± 0.00010"
    assert top.fmt(91.234) == "91.23%" and ppl.fmt(None) == "-"
    row = {"ppl": 12.3456, "ppl_err": 0.25}  # a compare.json row
    assert ppl.cell(row) == "12.346 ± 0.250"
    assert metrics() == METRICS and len({m.key for m in METRICS}) == len(METRICS)


def test_tables_render_from_the_metrics():
    base_only = EvalResult(ppl=3.0, ppl_err=0.1, chunks=1, tokens_scored=1, device="cpu")
    assert eval_rows(base_only) == [("PPL", "3.000 ± 0.100")]  # nothing against a base
    full = EvalResult(ppl=3.0, ppl_err=0.1, chunks=1, tokens_scored=1, device="cpu",
                      kld_mean=0.01, kld_err=0.001, kld_p99=0.1, same_top_pct=90.0,
                      ppl_ratio=1.01)
    assert [label for label, _ in eval_rows(full)] == [m.label for m in METRICS]
    assert set(metrics("kld_mean", "kld_p99", "same_top_pct")) <= {
        m for m in METRICS if m.label in COMPARE_HEADERS}
