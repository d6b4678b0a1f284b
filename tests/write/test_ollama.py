"""`convert --ollama`: the Modelfile parses, and its TEMPLATE, run as Ollama runs it, renders
conversations exactly as the model's own chat template does."""

import re
import shlex
import shutil

import jinja2
import pytest

from conftest import error_line, run_cli
from lwq_gguf.write.ollama import TemplateUnsupported, derive_chat_format, go_template


def parse_modelfile(text: str) -> dict:
    """Ollama's Modelfile syntax: INSTRUCTION args, triple-quoted multi-line values, # comments."""
    out: dict = {"PARAMETER": []}
    for m in re.finditer(r'^(\w+)[ \t]+("""(.*?)"""|[^\n]*)$|^#[^\n]*$|^\s*$', text, re.M | re.S):
        if not m.group(1):
            continue
        key, value = m.group(1).upper(), m.group(3) if m.group(3) is not None else m.group(2)
        if key == "PARAMETER":
            name, raw = value.split(None, 1)
            out["PARAMETER"].append((name, shlex.split(raw)[0] if raw.startswith('"') else raw))
        else:
            assert key not in out, f"{key} given twice"
            out[key] = value
    consumed = re.sub(r'^(\w+)[ \t]+("""(.*?)"""|[^\n]*)$|^#[^\n]*$', "", text, flags=re.M | re.S)
    assert not consumed.strip(), f"unparsed Modelfile text: {consumed!r}"
    return out


def run_go_template(tpl: str, messages: list[dict]) -> str:
    """The subset of Go's text/template that lwq-gguf's TEMPLATE uses, executed like Ollama does."""
    tokens = re.split(r"(\{\{.*?\}\})", tpl, flags=re.S)

    def cond(expr: str, msg: dict, last: bool) -> bool:
        expr = expr.strip()
        if m := re.fullmatch(r'eq \.Role "(\w+)"', expr):
            return msg["role"] == m.group(1)
        if expr == "not $last":
            return not last
        if m := re.fullmatch(r'and \$last \(ne \.Role "(\w+)"\)', expr):
            return last and msg["role"] != m.group(1)
        raise AssertionError(f"unexpected template action {expr!r}")

    def block(i: int, msg, last, out: list | None) -> int:
        """Run tokens from i until the matching end/else; return the index of that token."""
        while i < len(tokens):
            t = tokens[i]
            act = t[2:-2].strip() if t.startswith("{{") else None
            if act is None:
                if out is not None:
                    out.append(t)
            elif act.startswith("range"):
                body = i + 1
                for j, m in enumerate(messages):
                    i = block(body, m, j == len(messages) - 1, out)
                if not messages:
                    i = block(body, None, False, None)
            elif act.startswith("$last :="):
                pass
            elif act == ".Content":
                if out is not None:
                    out.append(msg["content"])
            elif act.startswith("if "):
                taken = out is not None and cond(act[3:], msg, last)
                i = block(i + 1, msg, last, out if taken else None)
                while tokens[i][2:-2].strip().startswith("else if "):
                    e = tokens[i][2:-2].strip()[8:]
                    now = out is not None and not taken and cond(e, msg, last)
                    taken = taken or now
                    i = block(i + 1, msg, last, out if now else None)
            elif act == "end" or act.startswith("else"):
                return i
            else:
                raise AssertionError(f"unexpected template action {act!r}")
            i += 1
        return i

    out: list = []
    block(0, None, False, out)
    return "".join(out)


LIM = ("--strategy", "lim", "--imatrix", "none")  # the paper's planner: fast, not under test here

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


@pytest.mark.slow
def test_convert_ollama_modelfile(tiny, tmp_path):
    from transformers import AutoTokenizer

    model = tiny("llama", 2, vocab="bpe")  # (the demo model's tokenizer and chat template)
    out = tmp_path / "m.gguf"
    p = run_cli("-q", "convert", model, "--avg-bits", "5", "-o", out, "--ollama", "--no-verify", *LIM,
                check=True)
    assert "wrote" in p.stdout and (tmp_path / "Modelfile").is_file()
    mf = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert (tmp_path / mf["FROM"]).resolve() == out.resolve()
    params = dict(mf["PARAMETER"])
    assert ("stop", "<|im_end|>") in mf["PARAMETER"] and "temperature" not in params
    tok = AutoTokenizer.from_pretrained(model)
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        if conv[0]["role"] != "system":  # Ollama prepends the Modelfile's SYSTEM
            conv = [{"role": "system", "content": mf["SYSTEM"]}] + conv
        assert run_go_template(mf["TEMPLATE"], conv) == want

    # a base model without a chat template: FROM only, and the user is told why
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "chat_template.jinja").unlink()
    p = run_cli("-q", "convert", bare, "--avg-bits", "5", "-o", tmp_path / "bare.gguf", "--ollama", *LIM,
                "--modelfile", tmp_path / "bare.Modelfile", "--no-verify", check=True)
    assert "no chat template" in p.stdout
    mf = parse_modelfile((tmp_path / "bare.Modelfile").read_text())
    assert mf["FROM"] == "./bare.gguf" and "TEMPLATE" not in mf

    # an existing Modelfile is not replaced without --force, and nothing else is written
    out2 = tmp_path / "m2.gguf"
    line = error_line(run_cli("convert", model, "--avg-bits", "5", "-o", out2, "--ollama"))
    assert "Modelfile" in line and "--force" in line and not out2.exists()


LLAMA3 = ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
          "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
NO_SYSTEM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
             "{{ raise_exception('no system role') }}{% endif %}{{ '[INST] ' + m['content'] + "
             "' [/INST]' if m['role'] == 'user' else m['content'] + '</s>' }}{% endfor %}")


def _jinja(src: str, bos: str):
    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    t = jinja2.Environment().from_string(src)
    return lambda msgs, gen: t.render(messages=msgs, add_generation_prompt=gen, bos_token=bos,
                                      raise_exception=raise_exception)


def test_llama3_template_drops_the_bos_the_tokenizer_adds():
    render = _jinja(LLAMA3, "<|begin_of_text|>")
    fmt = derive_chat_format(render, "<|begin_of_text|>")
    tpl = go_template(fmt)
    assert "<|begin_of_text|>" not in tpl and fmt.default_system is None
    for conv in CONVERSATIONS:
        assert "<|begin_of_text|>" + run_go_template(tpl, conv) == render(conv, True)


def test_underivable_template_is_refused():
    with pytest.raises((TemplateUnsupported, jinja2.TemplateError)):
        derive_chat_format(_jinja(NO_SYSTEM, "<s>"), "<s>")
