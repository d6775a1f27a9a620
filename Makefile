# Everyday commands. `make run` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Stage commands in dvc.yaml call `ratchet`, so the venv's bin must be on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# No phoning home: this machine has no internet, and these checks only cost start-up time.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup chromium postgres run test test-fast test-team team-up team-down ui screenshots repro dag lock bench clean

setup: $(VENV)/.installed

# The tested set exactly as constraints.txt pins it, without re-resolving it (pip's resolver
# over ~200 pins was most of setup's time); `pip check` then fails, naming the package, when
# pyproject.toml asks for something constraints.txt lacks: run `make lock`. uv installs the pins
# (downloads and unpacks in parallel: ~30 s for the 4 GB of torch's CUDA build and the rest,
# where pip took ~2.5 min one wheel at a time); where uv cannot (no uv wheel for this machine,
# or an index that only pip's own configuration names), pip installs the same pins.
UV_VERSION := 0.13.9
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) && \
	  $(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -r constraints.txt; } || \
	  $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-compile -r constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-compile -e .
	@# Bytecode on every core (pip compiles one file at a time); like pip, skip the few files of
	@# other Python versions that some packages ship, which do not compile. The project's own
	@# src/ and pipelines/ too: every stage process imports them, and where PYTHONDONTWRITEBYTECODE
	@# is set (CI images often set it) each one compiled them again (.dvcignore and .gitignore
	@# leave __pycache__ out of stage hashes and git; an edited file is recompiled as usual).
	@$(PY) -m compileall -q -j 0 $(VENV)/lib src pipelines > /dev/null || true
	@$(PY) -m pip check || { echo "constraints.txt lacks what pyproject.toml needs: run make lock"; exit 1; }
	@touch $@

## chromium: Debian's headless Chromium for the browser test (tests/test_browser.py drives it with
## Playwright); a no-op once /usr/bin/chromium exists. Needs root (or sudo) on a Debian machine.
CHROMIUM := /usr/bin/chromium
chromium: $(CHROMIUM)

$(CHROMIUM):
	$$(test "$$(id -u)" = 0 || echo sudo) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'

## postgres: Debian's PostgreSQL server binaries for team mode (a no-op when
## /usr/lib/postgresql/<version>/bin/pg_ctl exists). Needs root (or sudo) on a Debian machine.
PG_CTL := $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
postgres:
	@test -n "$(PG_CTL)" || $$(test "$$(id -u)" = 0 || echo sudo) sh -c 'apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-common && \
	  echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql'

## team-up: PostgreSQL, an MLflow server (basic auth, proxied artifacts), a Prefect server, a
## process work pool and worker, and the scheduled retrain deployment, all on 127.0.0.1, state in
## .team/; writes team.env (source it). team-down stops them all and keeps the data.
team-up: setup postgres
	$(PY) -m pipelines.team up

team-down: setup
	$(PY) -m pipelines.team down

## run: every pipeline in params.yaml through the Prefect flow (prepare -> train -> evaluate -> promote)
run: setup
	$(PY) -m pipelines.retrain

## test: the whole suite (slow tests included), one test file per core (most tests wait on
## process start-up, DVC and Prefect: two workers finish in about two thirds of the time);
## files with the most slow tests start first (tests/conftest.py orders them, xdist keeps it)
test: setup chromium
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

## test-team: the tests that start the team stack (tests/test_team.py; CI runs them after make test)
test-team: setup postgres
	$(PY) -m pytest -q -m team

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

## ui: MLflow UI on http://127.0.0.1:5000 over the local tracking database
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

## screenshots: the MLflow UI over mlflow.db (after `make run`) into docs/, with a confusion matrix
## and a forecast plot from reports/
screenshots: setup chromium
	$(PY) tests/browser_ui.py --root . --out docs

repro: setup
	dvc repro

dag: setup
	dvc dag

bench: setup
	$(PY) benchmarks/bench_tabular.py --csv ../shared/data/water_potability.csv
	$(PY) benchmarks/bench_image.py --root ../shared/data/clouds/clouds_train
	$(PY) benchmarks/bench_sequence.py --csv ../shared/data/electricity_consumption/electricity_train.csv

## lock: re-resolve the tested dependency set after editing pyproject.toml
lock:
	rm -rf /tmp/ratchet-lock && $(PYTHON) -m venv /tmp/ratchet-lock
	/tmp/ratchet-lock/bin/pip install --quiet -e '.[dev,team]'
	{ echo "# Tested dependency set: make installs exactly these ('pip install --no-deps -r constraints.txt')."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  /tmp/ratchet-lock/bin/pip freeze --all --exclude-editable | grep -vE '^(pip|wheel)=='; } > constraints.txt

clean:
	rm -rf data/demo data/prepared models reports checkpoints mlflow.db mlruns mlartifacts .dvc/cache
