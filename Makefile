# Set-up, run and test commands. Everything installs into .venv and .tools.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
BEAM_VERSION := 2.77.0
# Flink 1.20, the last 1.x line; runners/flink.py names the same version.
FLINK_VERSION := 1.20
PRISM_BIN := $(TOOLS)/bin/prism
FLINK_ARTIFACT := org.apache.beam:beam-runners-flink-$(FLINK_VERSION)-job-server:$(BEAM_VERSION)
FLINK_JAR := $(TOOLS)/beam-runners-flink-$(FLINK_VERSION)-job-server-$(BEAM_VERSION).jar
DEFAULT_INPUT := out/default-input/RC_2019-10.zst
INPUT ?= $(DEFAULT_INPUT)
OUTPUT ?= out/run
ARGS ?=

export NO_GCE_CHECK := true
export PYTHONUNBUFFERED := 1

.PHONY: run test bench bench-quick lint format tools clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

$(PRISM_BIN):
	mkdir -p $(TOOLS)/bin
	GOBIN=$(abspath $(TOOLS)/bin) GOFLAGS=-mod=mod go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_VERSION)

# Beam's Flink job server, fetched whole (it is a shaded jar). Where Maven
# cannot serve it, the answer is kept in $(FLINK_JAR).log and the build goes
# on: the Flink tests then fail as expected, quoting it.
$(FLINK_JAR):
	mkdir -p $(TOOLS)
	@if mvn -q -B dependency:copy -Dtransitive=false -Dartifact=$(FLINK_ARTIFACT) \
	  -DoutputDirectory=$(abspath $(TOOLS)) > $(FLINK_JAR).log 2>&1; then \
	  rm -f $(FLINK_JAR).log; \
	else \
	  echo "warning: Maven could not fetch $(FLINK_ARTIFACT); see $(FLINK_JAR).log"; \
	fi

tools: $(PRISM_BIN) $(FLINK_JAR)

$(DEFAULT_INPUT): | $(VENV)/.installed
	mkdir -p $(dir $@)
	$(PY) -m beam_pipeline.synth $@ --size 200MB --kind comments --month 2019-10

# Runs the job on the embedded synthetic archive, or on INPUT with ARGS.
run: $(VENV)/.installed $(if $(filter $(DEFAULT_INPUT),$(INPUT)),$(DEFAULT_INPUT))
	$(PY) -m beam_pipeline --input '$(INPUT)' --output '$(OUTPUT)' $(ARGS)

test: $(VENV)/.installed tools
	PUSHSHIFT_PRISM_BIN=$(abspath $(PRISM_BIN)) PUSHSHIFT_FLINK_JAR=$(abspath $(FLINK_JAR)) \
	  $(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m tests.bench.run

bench-quick: $(VENV)/.installed
	$(PY) -m tests.bench.run --quick

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check beam_pipeline transforms runners tests
	$(VENV)/bin/ruff format --check beam_pipeline transforms runners tests

format: $(VENV)/.installed
	$(VENV)/bin/ruff format beam_pipeline transforms runners tests
	$(VENV)/bin/ruff check --fix beam_pipeline transforms runners tests

clean:
	rm -rf out .pytest_cache
