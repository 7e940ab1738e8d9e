# Scribe: `make run` (install, train what is missing, serve on :8080) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8080
export PORT
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install train ladder run test lint bench bench-accuracy bench-ladder bench-first-drawing clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Scribe needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes tensorflow 2>/dev/null || true  # a venv from before the CPU build
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt tensorflow-serving-api
	touch $@

# Train every model that has no pushed version yet (cpu profile), into models/.
train: install
	$(PY) -m training missing --profile cpu

# The talk's lower rungs (softmax, dense, conv, conv-dropout), each with the talk's recipe, that
# have no version yet (about 5 minutes on 2 cores); a running service shows them once pushed.
ladder: install
	$(PY) -m training ladder --profile cpu

# Serve at once, and train beside it whatever model has no version yet: the page reads drawings
# as soon as digits is pushed, and writes once bard is (the model server picks up new versions by
# itself). Ctrl-C stops both; a push is atomic, so an interrupted training leaves no version.
# (A background job of a script ignores SIGINT, so the trap stops the trainer with SIGTERM.)
TRAIN_ARGS ?= --profile cpu
run: install
	@$(PY) -m training missing $(TRAIN_ARGS) & trainer=$$!; \
	trap 'kill $$trainer 2>/dev/null; wait $$trainer 2>/dev/null' EXIT INT TERM; \
	$(PY) -m serving

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (not part of make test): figures against baselines measured in the same run. They
# train their own cpu-profile models into bench/results/models first (benchmark 3).
BENCH_MODELS := bench/results/models
bench: install
	@command -v wrk > /dev/null || { [ "$$(id -u)" -eq 0 ] && S= || S=sudo; \
	    $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq wrk; }
	$(PY) bench/training_speed.py --model-base $(BENCH_MODELS)
	$(PY) bench/http_digits.py --model-base $(BENCH_MODELS)
	$(PY) bench/generation.py --model-base $(BENCH_MODELS) --repeats 7

# The digits profiles on full MNIST, with and without augmentation (about 70 minutes on 2 cores):
# accuracy on the official test digits beside the talk's, written into docs/benchmarks.md.
bench-accuracy: install
	$(PY) bench/digits_accuracy.py

# The talk's table: every rung of the ladder on full MNIST, beside the talk's figure, written into
# docs/benchmarks.md (at most 45 minutes on 2 cores).
bench-ladder: install
	$(PY) bench/ladder.py

# A new user's first minutes: a fresh clone of HEAD, `make run` with no cache, the first drawing read.
bench-first-drawing: install
	$(PY) bench/first_drawing.py

lint: install
	$(VENV)/bin/ruff check training serving client tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
