# camserve: every prediction also returns a class activation map.
# Python 3.11 and make are all a fresh machine needs; everything else is installed into .venv from requirements.txt.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN_DIR := .run/serve
INFERENCE_PORT ?= 8080
MANAGEMENT_PORT ?= 8081
METRICS_PORT ?= 8082
CONFIG ?= config/dev.properties
export PYTHONPATH := $(CURDIR)

.PHONY: help venv serve stop test archive train evaluate bench bench-maps loadtest clean

help:
	@echo "make serve     start TorchServe with the default model on 127.0.0.1:$(INFERENCE_PORT) (background)"
	@echo "make stop      stop that server"
	@echo "make test      install what is missing and run the whole test suite"
	@echo "make archive   (re)build model_store/shapes.mar"
	@echo "make train     retrain the default model (models/shapes/)"
	@echo "make evaluate  measure the default model's accuracy and localization (docs/shapes-model.md)"
	@echo "make bench     serving benchmark: built-in vs our handler through TorchServe (docs/serving-benchmark.md; BENCH_ARGS=...)"
	@echo "make bench-maps in-process map overhead (time, peak memory), against pytorch-grad-cam, torchcam and Captum (docs/benchmarks.md)"
	@echo "make loadtest  Locust load test with SLO gates (starts a server if none answers; LOADTEST_ARGS=...)"

# The venv is rebuilt when requirements.txt changes; the stamp records the last successful install.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

model_store/shapes.mar: $(VENV)/.installed $(shell find camserve handlers -name '*.py') models/shapes/model-config.yaml models/shapes/shapes_net.pt models/shapes/index_to_name.json
	$(PY) scripts/build_archive.py --name shapes --model-dir models/shapes --export-path model_store

# make archive                     -> model_store/shapes.mar
# make archive MODEL=resnet18 WEIGHTS=<state-dict file | torchvision weights name> [LABELS=..] [METHOD=..] [LAYER=..] [NAME=..]
MODEL ?= shapes
ifeq ($(MODEL),shapes)
archive: model_store/shapes.mar
else
archive: $(VENV)/.installed
	$(PY) scripts/build_archive.py --torchvision $(MODEL) --weights "$(WEIGHTS)" $(if $(LABELS),--labels "$(LABELS)") \
		$(if $(METHOD),--method $(METHOD)) $(if $(LAYER),--layer "$(LAYER)") $(if $(NAME),--name $(NAME))
endif

serve: model_store/shapes.mar
	$(PY) -m camserve.server start --run-dir $(RUN_DIR) --config $(CONFIG) \
		--inference-port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --metrics-port $(METRICS_PORT)

stop:
	@test -x $(PY) && $(PY) -m camserve.server stop --run-dir $(RUN_DIR) || true

test: model_store/shapes.mar
	$(PY) -m pytest

train: $(VENV)/.installed
	$(PY) scripts/train_shapes.py

evaluate: $(VENV)/.installed
	$(PY) scripts/evaluate_shapes.py

# About 40 minutes: two models x six variants x three concurrencies x two batch sizes, each a Locust run.
bench: $(VENV)/.installed
	$(PY) load_tests/serving_benchmark.py $(BENCH_ARGS)

# About 40 minutes on 2 cores: default model + resnet50, cam and gradcam, batch 1 and 8, time and peak memory (each
# variant in three fresh processes), against pytorch-grad-cam, torchcam and Captum.
bench-maps: $(VENV)/.installed
	$(PY) scripts/bench_overhead.py --references --memory $(BENCH_ARGS)

loadtest: model_store/shapes.mar
	$(PY) load_tests/run_loadtest.py $(LOADTEST_ARGS)

clean:
	rm -rf .run model_store/*.mar
