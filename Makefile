# dynzoo: `make report` (the zoo report) and `make test` (the test suite) set themselves up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.dynzoo-installed

.PHONY: setup report test test-all test-unit test-timm check-floor bench clean

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
# tensors of 256 KiB and more are mmap'd, so a long-lived xdist worker returns freed model memory to the system
# (in a full run of 56 models one worker grew to 12.5 GiB and was killed by the OOM killer)
export MALLOC_MMAP_THRESHOLD_ := 262144
# (`-m "not slow"`: the zoo-wide sweeps that repeat a per-family check on every model, and the longer training and
# compile runs; `make test-all` runs them too)
test: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup -q -p no:cacheprovider -m "not slow" --durations=25
	$(BIN)/python scripts/run_timm_model_tests.py -n 2

test-all: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup -q -p no:cacheprovider --durations=25
	$(BIN)/python scripts/run_timm_model_tests.py -n 2

test-unit: setup
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow"

test-timm: setup
	$(BIN)/python scripts/run_timm_model_tests.py -n 2

# the oldest timm that pyproject.toml allows, installed alone into its own prefix, ahead of the venv's timm on
# PYTHONPATH: every model builds (on the meta device), and one model of each family passes the features /
# forward_intermediates test and the reparameterization test (both modes, the inference_mode=True round trip)
TIMM_FLOOR   := $(shell sed -n 's/^ *"timm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_PREFIX := .cache/timm-$(TIMM_FLOOR)
FLOOR_MODELS := fmdconv_mobilenetv2_050 a2d2c_resnet18 a2d2c_plus_mobilenetv2_050 odconv_mobilenetv2_050 \
                dyconv_resnet18 condconv_resnet18 attnet_xxs dmf_xxs sgdm_cspdarknet_n
FLOOR_K      := $(subst $(eval) , or ,$(strip $(FLOOR_MODELS)))
check-floor: setup
	test -n "$(TIMM_FLOOR)"
	test -d $(FLOOR_PREFIX)/timm || $(BIN)/python -m pip install --quiet --no-deps --target $(FLOOR_PREFIX) timm==$(TIMM_FLOOR)
	PYTHONPATH=$(FLOOR_PREFIX) $(BIN)/python -c "import timm; assert timm.__version__ == '$(TIMM_FLOOR)', timm.__file__"
	PYTHONPATH=$(FLOOR_PREFIX) $(BIN)/python -m pytest tests/test_contract.py tests/test_reparam.py -n 2 --dist loadgroup \
		-q -p no:cacheprovider -k "meta_device or ((forward_intermediates or reparameterize) and ($(FLOOR_K)))"

bench: setup
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
