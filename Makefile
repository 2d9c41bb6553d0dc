# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# the project (torch's CPU build first, so that nothing pulls a CUDA build), then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# llama-cpp-python (GGUF runtime and quantiser) is built once from its PyPI sdist, portable
# (GGML_NATIVE=OFF), and its wheel kept here so that the next install takes seconds.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SDIST_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_SDIST ?= $(HOME)/.cache/sftflow/sdist
LLAMA_WHEELS ?= $(HOME)/.cache/sftflow/wheels

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	test -f $(LLAMA_SDIST)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz || $(BIN)/python -m pip download -q \
	  --no-deps --no-binary :all: -d $(LLAMA_SDIST) "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	echo "$(LLAMA_SDIST_SHA256)  $(LLAMA_SDIST)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz" | sha256sum -c --quiet -
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip wheel -q --no-deps -w $(LLAMA_WHEELS) \
	    $(LLAMA_SDIST)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	$(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	# gguf-py of the same sdist: transformers reads a tokenizer out of a GGUF file with it
	rm -rf $(LLAMA_SDIST)/gguf-py && tar -xzf $(LLAMA_SDIST)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz \
	  -C $(LLAMA_SDIST) --strip-components=3 llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	$(BIN)/python -m pip install -q --no-deps $(LLAMA_SDIST)/gguf-py
	$(BIN)/python -m pip install -q -e ".[dev]"
	SFTFLOW_SDIST_CACHE=$(LLAMA_SDIST) $(BIN)/python -m tasks.export.tools
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sftflow demo

# The import contracts first (pyproject.toml, docs/architecture.md): a change that breaks a layer fails here.
# The dashboard test drives headless Chromium, the Modelfile test Go's text/template (Debian's packages,
# installed when missing).
test: $(STAMP)
	$(BIN)/lint-imports
	bash scripts/ensure_chromium.sh
	bash scripts/ensure_go.sh
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .sftflow .pytest_cache
