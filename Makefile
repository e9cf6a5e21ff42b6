# Thin targets: humans and .ci/run call the same ones.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEFAULT_MODEL ?= smollm2-135m

# llama-cpp-python compiles llama.cpp. On x86 we build for a portable AVX2 baseline rather than
# -march=native: native builds on CPUs with AMX crash in ggml's AMX matmul on machines (VMs,
# sandboxes) whose kernel does not grant AMX state, and a wheel cached by pip would carry a
# native build to other machines. The built wheel is cached per version and flags.
LLAMA_CPP_VERSION ?= 0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
else
LLAMA_CMAKE_ARGS ?=
endif
WHEEL_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/clawctl/wheels/$(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-16)
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: run test test-agent bench lint install model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	ls $(WHEEL_CACHE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --quiet --no-deps --no-cache-dir \
		-w $(WHEEL_CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) install --quiet --no-deps --force-reinstall $(WHEEL_CACHE)/llama_cpp_python-*.whl
	$(PIP) install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# The build-time tools (torch CPU, transformers, peft): tests and benchmarks convert a model and
# train an adapter; `make run` does not need them (`pip install 'clawctl[distill]'` adds them).
CONVERT_STAMP := $(VENV)/.convert-stamp
$(CONVERT_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[convert,distill]'
	touch $(CONVERT_STAMP)

# Before clawd runs there is no daemon to ask, so the model is fetched with the same build
# operation clawd itself runs for `clawctl models pull` (into this user's store: the one `make run`
# serves). With a daemon running, use `clawctl models pull`.
model: install
	$(PY) -m clawctl.build pull '{"ref": "$(DEFAULT_MODEL)"}' > $(VENV)/pull.log \
		|| (tail -n 3 $(VENV)/pull.log; exit 1)

run: model
	$(VENV)/bin/clawd

test: model $(CONVERT_STAMP)
	$(PY) -m pytest

# The real OpenClaw agent on clawd (tests/test_openclaw_agent.py): Node from npm's
# node-linux-<arch> package and OpenClaw from npm, installed once into the user's cache (outside
# the repository); only the npm registry is needed. Each is unpacked into a temporary directory
# and renamed into place, so an interrupted install is never taken for a finished one.
NODE_VERSION ?= 24.22.3
OPENCLAW_VERSION ?= 2026.9.6
AGENT_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/clawctl/agent
NODE_ARCH := $(if $(filter aarch64 arm64,$(shell uname -m)),arm64,x64)
NODE_DIR := $(AGENT_CACHE)/node-$(NODE_VERSION)-linux-$(NODE_ARCH)
OPENCLAW_DIR := $(AGENT_CACHE)/openclaw-$(OPENCLAW_VERSION)
OPENCLAW_BIN := $(OPENCLAW_DIR)/node_modules/.bin/openclaw

$(NODE_DIR)/bin/node:
	rm -rf $(NODE_DIR).part && mkdir -p $(NODE_DIR).part
	cd $(NODE_DIR).part && npm pack --silent node-linux-$(NODE_ARCH)@$(NODE_VERSION) >/dev/null \
		&& tar xzf node-linux-$(NODE_ARCH)-$(NODE_VERSION).tgz
	rm -rf $(NODE_DIR) && mv $(NODE_DIR).part/package $(NODE_DIR) && rm -rf $(NODE_DIR).part

$(OPENCLAW_BIN): $(NODE_DIR)/bin/node
	rm -rf $(OPENCLAW_DIR).part && mkdir -p $(OPENCLAW_DIR).part
	cd $(OPENCLAW_DIR).part && echo '{"private": true}' > package.json \
		&& PATH=$(NODE_DIR)/bin:$$PATH npm install --silent --no-audit --no-fund openclaw@$(OPENCLAW_VERSION)
	rm -rf $(OPENCLAW_DIR) && mv $(OPENCLAW_DIR).part $(OPENCLAW_DIR)

test-agent: install $(OPENCLAW_BIN)
	OPENCLAW_BIN=$(OPENCLAW_BIN) OPENCLAW_NODE_DIR=$(NODE_DIR)/bin $(PY) -m pytest tests/test_openclaw_agent.py

lint: install
	$(VENV)/bin/ruff check clawctl tests bench
	$(VENV)/bin/ruff format --check clawctl tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: model $(CONVERT_STAMP)
	$(PY) bench/foundation.py
	$(PY) bench/snapshots.py
	$(PY) bench/adapters.py
	$(PY) bench/cascade.py
	$(PY) bench/concurrency.py
	$(PY) bench/kv_layout.py
	$(PY) bench/onnx_dedup.py
	$(PY) bench/agents.py
	$(PY) bench/tool_accuracy.py
	$(PY) bench/fleet.py
	$(PY) bench/routing.py
	$(PY) bench/distill.py
	$(PY) bench/unseen.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
