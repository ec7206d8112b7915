# dynzoo: `make report` (the zoo report) and `make test` (the test suite) set themselves up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.dynzoo-installed

.PHONY: setup report test test-unit test-timm bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# the main job: build every model, run it, check params/MACs against the papers, print the table
report: setup
	$(BIN)/dynzoo report

# the whole test suite: dynzoo's tests, then timm's own tests/test_models.py on every dynzoo model
# (two pytest-xdist workers, one thread each, every test of one model on one worker)
export OMP_WAIT_POLICY := PASSIVE
test: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup -q -p no:cacheprovider --durations=25
	$(BIN)/python scripts/run_timm_model_tests.py -n 2

test-unit: setup
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

test-timm: setup
	$(BIN)/python scripts/run_timm_model_tests.py -n 2

bench: setup
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
