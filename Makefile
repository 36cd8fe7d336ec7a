# The two commands a newcomer needs: `make run` and `make test`; `make bench` measures the proxy.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run typecheck test test-tools bench-tools bench clean check-config docs

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# make run PORT=8081 UPSTREAM_PORT=9001: the gateway and its demo upstream elsewhere
# (the WeChat sandbox listens where conf/gateway.toml's providers.wechat.api_base says).
PORT ?= 8080
UPSTREAM_PORT ?= 9000
run: install
	@mkdir -p var
	$(BIN)/gateway serve --config conf/gateway.toml --port $(PORT) --demo --demo-upstream 127.0.0.1:$(UPSTREAM_PORT)

check-config: install
	$(BIN)/gateway check-config --config conf/gateway.toml

# redis-server (with redis-cli: the session store, its cluster and sentinel tests)
# and nginx (the forward-auth tests), with apt when missing.
test-tools:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for tool in redis-server nginx; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "not found:$$missing: installing with apt"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y $$missing >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y $$missing; }; \
	fi
	@redis-server --version

# mypy --strict over gateway/ and plugins/ (settings: [mypy] in setup.cfg).
typecheck: install
	$(BIN)/python -m mypy

test: install typecheck test-tools
	$(BIN)/python -m pytest -rs $(PYTEST_ARGS)

# nginx (the upstream) and wrk (the load) for `make bench`, with apt when missing.
# nginx lives in /usr/sbin, which is not on every user's PATH.
bench-tools: test-tools
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for tool in nginx wrk; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "not found:$$missing: installing with apt"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y $$missing >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y $$missing; }; \
	fi
	@$(BIN)/python -c "import aiohttp" 2>/dev/null || $(BIN)/python -m pip install --quiet aiohttp

# Figures, ratios and bench/results.json; BENCH_DURATION=10 BENCH_CONNECTIONS=16 and more: see bench/run.py.
bench: install bench-tools
	$(BIN)/python bench/run.py

# docs/configuration.md, generated from the declared options (tests/test_docs.py checks it).
docs: install
	$(BIN)/python -m gateway.reference > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf $(VENV) var build *.egg-info
