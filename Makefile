# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test redis-server clean check-config

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: install
	@mkdir -p var
	$(BIN)/gateway serve --config conf/gateway.toml --demo-upstream 127.0.0.1:9000

check-config: install
	$(BIN)/gateway check-config --config conf/gateway.toml

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing it with apt"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y redis-server >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y redis-server; }; \
	}
	@redis-server --version

test: install redis-server
	$(BIN)/python -m pytest -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
