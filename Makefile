# The user interface of the project. `make pipeline` and `make test` install what they need on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
# offline and quiet: no telemetry, no update checks; params.yaml is ploomber's env file
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PLOOMBER_VERSION_CHECK_DISABLED := 1
export PLOOMBER_STATS_ENABLED := false
export PLOOMBER_ENV_FILENAME := params.yaml
export DO_NOT_TRACK := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
# notebooks reach git without outputs or volatile metadata, cell ids kept (so `make export` and a save in Lab change nothing)
NBSTRIPOUT_ARGS := --keep-id --extra-keys "metadata.language_info.codemirror_mode metadata.language_info.file_extension metadata.language_info.mimetype metadata.language_info.nbconvert_exporter metadata.language_info.pygments_lexer metadata.language_info.version"

.PHONY: help setup git-setup data pipeline rebuild test test-fast lab mlflow-ui export check clean lock bench dag
.PHONY: sweep bench-sweep bench-scale bench-pipeline bench-noop bench-ui bench-suite bench-report

help: ## list the commands
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# what the venv is installed from, by content: `nbdev-export` rewrites pyproject.toml with the same bytes (a new mtime),
# which must not cost a reinstall; the file changes only when the lock or pyproject.toml do
DEPS_MD5 := $(VENV)/.deps.md5
$(DEPS_MD5): requirements.lock pyproject.toml
	@mkdir -p $(VENV); md5sum requirements.lock pyproject.toml | cmp -s - $@ || md5sum requirements.lock pyproject.toml > $@

$(STAMP): $(DEPS_MD5)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv, pinned; a venv made by uv or `uv pip sync` has no pip: bootstrap it with ensurepip first
	$(BIN)/python -m uv --version 2>/dev/null | grep -q "^uv $(UV_VERSION)[ (]" || { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null; $(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"; }
	@# bytecode: Python writes it on first import, for the modules a project uses; only where it may not
	@# (PYTHONDONTWRITEBYTECODE set, as in some container images) is all of it compiled here, or every process would
	@# compile its imports again (on a fresh clone, setup 12 s instead of 30 s, the first build about 12 s longer, once)
	$(BIN)/python -m uv pip install -q $(if $(PYTHONDONTWRITEBYTECODE),--compile-bytecode) --python $(BIN)/python -r requirements.lock
	$(BIN)/python -m uv pip install -q --python $(BIN)/python --no-deps -e .
	$(BIN)/jupyter server extension disable --sys-prefix ploomber >/dev/null 2>&1 || true
	@# the display name Lab writes back into a notebook on save: the one the committed notebooks carry
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null
	$(BIN)/nbs activate-env $(VENV)/bin/activate
	@# offline Lab: no news feed prompt, no update check (both would reach the internet)
	mkdir -p $(VENV)/share/jupyter/lab/settings && echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $@

setup: $(STAMP) $(VENV)/.git-setup ## create .venv from the pinned lock, prepare Jupyter and git for notebooks

# git-setup once per venv (a no-op `make pipeline` should not pay ten git calls); `make git-setup` does it again
$(VENV)/.git-setup: $(STAMP)
	@mkdir -p $(VENV) && $(MAKE) --no-print-directory git-setup && touch $@

# In a linked worktree the repository's config is shared: there, configure only once `extensions.worktreeConfig` is on.
git-setup: ## git for notebooks: nbstripout as clean filter (outputs and volatile metadata never committed, cell ids kept), nbdev's diff and merge drivers
	@if ! git rev-parse --git-dir >/dev/null 2>&1; then echo "git-setup: not a git repository, skipped"; \
	elif [ "$$(git rev-parse --git-dir)" != "$$(git rev-parse --git-common-dir)" ] && [ "$$(git config --bool extensions.worktreeConfig)" != true ]; then \
	  echo "git-setup: linked worktree: run 'git config extensions.worktreeConfig true' once, then make git-setup, to configure it alone"; \
	else scope=$$([ "$$(git rev-parse --git-dir)" != "$$(git rev-parse --git-common-dir)" ] && echo --worktree || echo --local); \
	  git config $$scope filter.nbstripout.clean '$(VENV)/bin/nbstripout $(NBSTRIPOUT_ARGS)' && \
	  git config $$scope filter.nbstripout.smudge cat && \
	  git config $$scope diff.jupyternotebook.command '$(VENV)/bin/nbdev-diff-driver' && \
	  git config $$scope merge.jupyternotebook.name 'notebook merge driver (nbdev-merge)' && \
	  git config $$scope merge.jupyternotebook.driver '$(VENV)/bin/nbdev-merge %O %A %B %P'; fi

data: setup ## put the raw data in data/raw (dvc pull, else regenerate from the package), checked by md5
	$(BIN)/nbs data

check: setup ## check params.yaml
	$(BIN)/nbs check

# --data: what `make data` does, then the build, in one process (a no-op make pipeline costs one interpreter start)
pipeline: setup ## put the raw data in place (as make data), run the pipeline (only what changed), say where its products and MLflow run are
	$(BIN)/nbs build --data

rebuild: setup ## run every task of the pipeline again (the raw data checked first, as make data)
	$(BIN)/nbs build --data --force

test: setup data ## run the whole test suite (CI runs this)
	$(BIN)/python -m pytest

test-fast: setup data ## the suite without the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

lab: setup ## open JupyterLab on the notebooks (with jupyter_server_config.py: a save that changes no content leaves git clean)
	JUPYTER_CONFIG_PATH=$(CURDIR) $(BIN)/jupyter lab --no-browser notebooks

# one browser's UI: one worker, and no GenAI job runners (MLflow's defaults, 4 workers and 8 job-runner processes, took
# twice as long to answer and 6x the memory: make bench-ui)
UI_PORT ?= 5000
mlflow-ui: setup ## browse runs, plots, notebooks and registered models (UI_PORT=5000)
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning (the Model training view: runs, datasets, models)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT) --workers 1

export: setup ## export notebooks/lib to nbs_lib (nbdev) and strip notebook outputs (cell ids kept: on a clean clone it changes nothing)
	$(BIN)/nbdev-export
	$(BIN)/nbstripout $(NBSTRIPOUT_ARGS) notebooks/lib/*.ipynb notebooks/tasks/*.ipynb notebooks/explore/*.ipynb

dag: setup ## draw the DAG offline, with each task's status: build/pipeline.html (self-contained) and build/pipeline.svg
	$(BIN)/nbs dag

# bench/ holds the template's own benchmarks (of its worked example); a project made by `make new` has none
HAVE_BENCH = @test -d bench || { echo "error: no bench/ here: the workflow's benchmarks live in the template repository (make new leaves them out)" >&2; exit 2; }
# the serving benchmark's outside load client: Debian's wrk, installed when missing and we may (root, apt); else its rows say why they are skipped
HAVE_WRK = @command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	{ echo "installing wrk (apt-get)"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }; } || true; }

bench: setup data ## every benchmark with a goal, each against its baseline in the same run, then one table into the README (about 45 min)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_pipeline.py --repeats 3 --full
	$(BIN)/python bench/bench_noop.py
	$(HAVE_WRK)
	$(BIN)/python bench/bench_serving.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_suite.py
	$(BIN)/python bench/report.py

bench-pipeline: setup data ## benchmark: the workflow's own overhead against plain Python: builds, edit-to-result, no-ops, tracking (bench/results.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_pipeline.py --repeats 3 --full

bench-noop: setup data ## benchmark: a no-op make pipeline right after a build and after each verb (bench/results-noop.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_noop.py

bench-ui: setup data ## benchmark: make mlflow-ui against mlflow ui with MLflow's defaults: time to answer, processes, memory (bench/results-ui.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_ui.py

bench-suite: setup data ## benchmark: the wall time of make test against its tests' summed durations (bench/results-suite.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_suite.py

bench-report: setup ## the README's benchmark table, again, from the result files in bench/ (bench/report.py)
	$(HAVE_BENCH)
	$(BIN)/python bench/report.py

bench-scale: setup data ## benchmark: build time and peak memory at 1x, 3x, 10x the rows (years replicated), against plain Python (bench/results-scale.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_scale.py

clean: ## remove build products (not the MLflow store, not the venv)
	rm -rf build

lock: ## re-resolve requirements.lock from pyproject.toml and regenerate environment.yml from it
	$(BIN)/python -m uv pip compile pyproject.toml --extra dev --python-version 3.11 --no-header -q -o requirements.lock
	$(BIN)/python -c "import re; pins=[l.strip() for l in open('requirements.lock') if re.match(r'^[A-Za-z0-9]', l)]; \
	open('environment.yml','w').write('# conda users: conda env create -f environment.yml (generated by make lock from requirements.lock)\nname: nbs-flights\nchannels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n' + ''.join(f'    - {p}\n' for p in pins) + '    - -e .\n')"

# this repository as a template (copier.yml, notebooks/lib/12_scaffold.ipynb)
.PHONY: new template-update
new: setup ## a new project from this template on your data: make new DEST=../my-project DATA=path/to/data.csv [ARGS="-d target=price"]
	@test -n "$(DEST)" -a -n "$(DATA)" || { echo "error: make new DEST=<new folder> DATA=<CSV or parquet file> [ARGS='--defaults -d target=<column>']" >&2; exit 2; }
	$(BIN)/nbs new "$(DEST)" --data "$(DATA)" $(ARGS)

template-update: setup ## in a generated project: bring in the template's later changes (copier update, conflicts shown inline)
	$(BIN)/nbs update $(ARGS)

.PHONY: onnx bench-onnx
onnx: setup ## the champion as ONNX: converted, checked against sklearn on the test set (1e-6), logged to MLflow (ARGS="--version 3")
	$(BIN)/nbs onnx $(ARGS)

bench-onnx: pipeline ## benchmark: sklearn vs the service's compiled path vs onnxruntime, 1 and 20,000 rows, size and load time (bench/results-onnx.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_onnx.py

.PHONY: register rollback canary
canary: setup ## canary: the challenger answers FRACTION of the requests, on a running service too: make canary FRACTION=0.05 (0 ends it)
	@test -n "$(FRACTION)" || { echo "error: give the share of requests: make canary FRACTION=0.05 (0 ends the canary)" >&2; exit 2; }
	$(BIN)/nbs canary --fraction $(FRACTION) $(ARGS)

rollback: setup ## blue-green: champion back to the previous champion version, imported so a running `make serve` swaps it in
	$(BIN)/nbs rollback $(ARGS)
	$(BIN)/nbs serve import

register: setup ## register the best run of the latest sweep (or build) as challenger; promote it to champion if it passes the gate
	$(BIN)/nbs register $(ARGS)

.PHONY: data-push data-pull reproduce

data-push: data ## share data/raw: dvc push its bytes to the default DVC remote
	$(BIN)/dvc push

data-pull: setup ## get data/raw from the default DVC remote (dvc pull), then check it by md5
	$(BIN)/dvc pull
	$(BIN)/nbs data

reproduce: setup ## re-run a recorded run from its commit and data and compare metrics: make reproduce RUN=<run id|models:/name@alias>
	@test -n "$(RUN)" || { echo "error: name the run: make reproduce RUN=<run id or models:/name@alias>" >&2; exit 2; }
	$(BIN)/nbs reproduce $(RUN)

SWEEP_ARGS ?=
sweep: pipeline ## run the params.yaml sweep grid in parallel, one MLflow child run per configuration (SWEEP_ARGS="--jobs 2 --set ...")
	$(BIN)/nbs sweep $(SWEEP_ARGS)

bench-sweep: data ## benchmark: per-configuration overhead of a sweep over plain Python, parallel efficiency (bench/results-sweep.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_sweep.py

# serving (issue 4): the BentoML store is project-local (build/bentoml, set from serve.bentoml_home by `nbs serve`)
.PHONY: bento container serve bench-serving

bento: setup ## import the MLflow champion into BentoML and build the Bento and its Dockerfile (offline)
	$(BIN)/nbs serve build

container: setup ## build the Bento, then its image with docker, podman or buildah (says so when none runs)
	$(BIN)/nbs serve containerize

serve: setup ## serve the MLflow champion on http://127.0.0.1:3000 (after the gate: make register)
	$(BIN)/nbs serve run

bench-serving: data ## benchmark the service: batches over HTTP vs in-process; single rows under wrk vs a bare Starlette endpoint, BentoML's path, 2 workers
	$(HAVE_BENCH)
	$(HAVE_WRK)
	$(BIN)/python bench/bench_serving.py

.PHONY: monitor retrain

monitor: setup ## drift report of the latest build and the service's prediction log (build/monitor/report/index.html)
	$(BIN)/nbs monitor

retrain: rebuild ## retrain on the data in data/raw (every task again), then the gate: nbs register promotes only a better model
	$(BIN)/nbs register

.PHONY: stress

STRESS_ARGS ?=
stress: data ## the service under load (120 s, concurrency 32), schema fuzzing, hostile input: errors, p99, memory, 5xx, readiness (bench/results-stress.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/stress.py $(STRESS_ARGS)

# the team setup (README "Team"): a tracking server on PostgreSQL with S3 artifacts, DVC's remote on the same S3
.PHONY: team-up team-down team-status bench-team
TEAM_STATE ?= .team
TEAM_ARGS ?=
team-up: setup ## start the team stack on 127.0.0.1 (PostgreSQL, moto S3, mlflow server) and point DVC's remote at its S3
	$(BIN)/python team/stack.py up --state $(TEAM_STATE) --dvc-project . $(TEAM_ARGS)

team-down: setup ## stop the team stack, DVC back to the committed remote (TEAM_ARGS=--remove also deletes its data)
	$(BIN)/python team/stack.py down --state $(TEAM_STATE) --dvc-project . $(TEAM_ARGS)

bench-team: data ## a build against the team stack next to the embedded default, in one run (bench/results-team.md)
	$(HAVE_BENCH)
	$(BIN)/python bench/bench_team.py --out bench/results-team.md

team-status: setup ## is each server of the team stack up, and where
	$(BIN)/python team/stack.py status --state $(TEAM_STATE)
