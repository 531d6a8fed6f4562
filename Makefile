# Two set-up commands for a fresh Debian/Ubuntu machine, each idempotent:
#   make train   the main job on the embedded default (local gateway + memcached, real data)
#   make test    the test suite against real memcached and Redis on 127.0.0.1
VENV ?= .venv
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := memcached redis-server rabbitmq-server dataset-fashion-mnist iproute2 \
  podman buildah podman-docker mmdebstrap runc \
  chromium chromium-driver
# torch's CPU build (the `torch` extra accepts any torch >= 2.0): set TORCH_INDEX to
# https://download.pytorch.org/whl/cpu where PyPI's default Linux wheel would be a CUDA build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
WORKERS ?= 2
TARGET ?= 0.85

.PHONY: deps venv servers train test lint bench clean
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	$(VENV)/bin/pip install -q -e '.[dev,torch,s3]'
	touch $@

servers: deps
	scripts/servers.sh start

train: deps venv
	$(VENV)/bin/emnist train --workers $(WORKERS) --dataset fashion-mnist --target-accuracy $(TARGET) --down

test: deps venv servers
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: deps venv
	$(VENV)/bin/emnist bench train --workers 1,2 --json results/bench-train.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
