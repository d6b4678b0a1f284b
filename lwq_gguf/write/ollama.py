"""An Ollama ``Modelfile`` for a converted GGUF: FROM, TEMPLATE, SYSTEM and PARAMETERs.

The model's Jinja chat template (tokenizer_config.json or chat_template.jinja, rendered by
transformers) is rendered with marker messages; from where the markers land we read, per role, the
text before and after a message, the generation prompt and any default system prompt the template
inserts. That is turned into an Ollama Go template over ``.Messages`` and accepted only if
re-rendering it reproduces the Jinja template exactly on several conversations; otherwise the
Modelfile has no TEMPLATE (Ollama then falls back to the GGUF's ``tokenizer.chat_template``) and
the reason is reported. A leading BOS token is left out of the TEMPLATE when the tokenizer adds it
itself (llama.cpp and Ollama do the same from the GGUF). Stop tokens: the end of an assistant turn,
the start of a user turn and the EOS token. Sampling PARAMETERs come from generation_config.json.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lwq_gguf import __version__

ROLES = ("system", "user", "assistant")
_MARK = {"system": "SYSQ7MARK", "user": "USRQ7MARK", "assistant": "ASTQ7MARK"}


class TemplateUnsupported(Exception):
    """The chat template does not follow a per-role wrap that a Go template can express."""


@dataclass(frozen=True)
class ChatFormat:
    bos: str  # literal text before everything (the BOS token when the template writes it)
    pre: dict[str, str]  # role -> text before a message's content
    suf: dict[str, str]  # role -> text after it
    gen: str  # the generation prompt (assistant turn opener)
    default_system: str | None  # inserted by the template when no system message is given

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the derived Go template renders (Ollama prepends SYSTEM when none is given)."""
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + messages
        out = self.bos + "".join(self.pre[m["role"]] + m["content"] + self.suf[m["role"]]
                                 for m in messages)
        return out + (self.gen if add_generation_prompt else "")


def _between(text: str, marks: list[str]) -> list[str]:
    """The text before, between and after the markers, which must occur once each, in order."""
    parts, rest = [], text
    for m in marks:
        if rest.count(m) != 1:
            raise TemplateUnsupported(f"message text {m!r} is not rendered exactly once")
        head, rest = rest.split(m)
        parts.append(head)
    return parts + [rest]


def _cut_prefix(s: str, prefix: str, what: str) -> str:
    if not s.startswith(prefix):
        raise TemplateUnsupported(f"{what} is not a fixed wrap")
    return s[len(prefix):]


def derive_chat_format(render, bos_token: str | None) -> ChatFormat:
    """``render(messages, add_generation_prompt) -> str`` (the Jinja template) -> ChatFormat.

    ``bos_token``: the BOS text the tokenizer adds by itself (so the TEMPLATE leaves it out)."""
    def msg(role, n=""):
        return {"role": role, "content": _MARK[role] + n}

    full = [msg("system"), msg("user", "1"), msg("assistant", "1"), msg("user", "2")]
    marks = [m["content"] for m in full]
    s0, s1, s2, s3, s4 = _between(render(full, True), marks)
    suf_user = _between(render(full, False), marks)[4]
    suf_asst = _between(render(full[1:3], False), marks[1:3])[2]
    gen = _cut_prefix(s4, suf_user, "the user turn's end")
    pre_user = _cut_prefix(s3, suf_asst, "the assistant turn's end")
    pre_asst = _cut_prefix(s2, suf_user, "the user turn's end")
    if not s1.endswith(pre_user):
        raise TemplateUnsupported("the system turn's end is not a fixed wrap")
    suf_sys = s1[: len(s1) - len(pre_user)]
    bos = bos_token if bos_token and s0.startswith(bos_token) else ""
    pre_sys = s0[len(bos):]
    head = _between(render(full[1:], True), marks[1:])[0]
    default = None
    if head != bos + pre_user:
        start, end = bos + pre_sys, suf_sys + pre_user
        if not (head.startswith(start) and head.endswith(end)) or len(head) < len(start + end):
            raise TemplateUnsupported("what the template writes without a system message is "
                                      "not a default system prompt")
        default = head[len(start): len(head) - len(end)]
    fmt = ChatFormat(bos, {"system": pre_sys, "user": pre_user, "assistant": pre_asst},
                     {"system": suf_sys, "user": suf_user, "assistant": suf_asst}, gen, default)
    _verify(fmt, render)
    return fmt


def _verify(fmt: ChatFormat, render) -> None:
    convs = [[("user", "Hi there")], [("system", "Be brief."), ("user", "Hi")],
             [("user", "a"), ("assistant", "b"), ("user", "c")],
             [("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
              ("assistant", "a2"), ("user", "q3")]]
    for conv in convs:
        msgs = [{"role": r, "content": c} for r, c in conv]
        if fmt.render(msgs) != render(msgs, True):
            raise TemplateUnsupported(f"the derived template differs from the Jinja one on a "
                                      f"{len(msgs)}-message conversation")


def go_template(fmt: ChatFormat) -> str:
    """Ollama's Go template (over .Messages) for ``fmt``; a last assistant message stays open.

    ``fmt.bos`` is left out: llama.cpp adds the BOS token itself, as the GGUF says."""
    texts = [fmt.gen, *fmt.pre.values(), *fmt.suf.values()]
    if any("{{" in t or "}}" in t or '"""' in t for t in texts):
        raise TemplateUnsupported("the template's text contains '{{', '}}' or '\"\"\"'")
    branches = []
    for i, role in enumerate(ROLES):
        suf = fmt.suf[role]
        if role == "assistant":
            suf = f"{{{{ if not $last }}}}{suf}{{{{ end }}}}" if suf else ""
        branches.append(f"{{{{ {'if' if i == 0 else 'else if'} eq .Role \"{role}\" }}}}"
                        f"{fmt.pre[role]}{{{{ .Content }}}}{suf}")
    return ("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + "".join(branches) + "{{ end }}"
            + f"{{{{ if and $last (ne .Role \"assistant\") }}}}{fmt.gen}{{{{ end }}}}{{{{ end }}}}")


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _stops(fmt: ChatFormat, eos: str | None) -> list[str]:
    out = []
    for s in (fmt.suf["assistant"].strip(), eos or "",
              (re.match(r"<[^<>\s]+>", fmt.pre["user"].strip()) or [""])[0]):
        if s and s not in out:
            out.append(s)
    return out


_GEN_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "min_p": "min_p", "repetition_penalty": "repeat_penalty"}


def modelfile_text(gguf: Path, model_dir: Path, modelfile: Path) -> tuple[str, list[str]]:
    """(Modelfile text, notes for the user) for ``gguf`` converted from ``model_dir``."""
    from transformers import AutoTokenizer

    notes: list[str] = []
    rel = os.path.relpath(gguf.resolve(), modelfile.resolve().parent)
    lines = [f"# Ollama Modelfile written by lwq-gguf {__version__} for {gguf.name}",
             f"# ollama create NAME -f {modelfile.name}",
             f"FROM {rel if rel.startswith('.') else './' + rel}"]
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any tokenizer problem only costs the TEMPLATE
        tok = None
        notes.append(f"no TEMPLATE: the tokenizer in {model_dir} does not load ({e})")
    fmt = None
    if tok is not None and not getattr(tok, "chat_template", None):
        notes.append(f"no TEMPLATE: {model_dir} has no chat template (a base model); Ollama will "
                     "send prompts as they are")
    elif tok is not None:
        def render(msgs, gen):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        try:
            adds_bos = bool(tok.bos_token_id is not None
                            and tok("x").input_ids[:1] == [tok.bos_token_id])
            fmt = derive_chat_format(render, tok.bos_token if adds_bos else None)
            template = go_template(fmt)
            lines.append(f'TEMPLATE """{template}"""')
            if fmt.default_system is not None:
                lines.append(f'SYSTEM """{fmt.default_system}"""')
            lines += [f"PARAMETER stop {_quote(s)}" for s in _stops(fmt, tok.eos_token)]
        except Exception as e:  # noqa: BLE001 - jinja errors and TemplateUnsupported alike
            fmt = None
            notes.append(f"no TEMPLATE: the chat template could not be turned into Ollama's ({e}); "
                         "Ollama falls back to the GGUF's tokenizer.chat_template")
    gen_cfg = model_dir / "generation_config.json"
    try:
        gc = json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else {}
    except (OSError, ValueError):
        gc = {}
    for key, name in _GEN_PARAMS.items():
        if isinstance(gc.get(key), (int, float)) and not isinstance(gc.get(key), bool):
            lines.append(f"PARAMETER {name} {gc[key]}")
    return "\n".join(lines) + "\n", notes
