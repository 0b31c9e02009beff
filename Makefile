# Every set-up step lives here: a clean clone with only Python needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install tools test test-slow faults demo bench gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard proto/*.proto) $(wildcard proto/*.c) | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,hf,lightning,torchtitan]'
	touch $(STAMP)

install: $(STAMP)

# Tools the tests use, installed when we are root with apt-get; anywhere else, or when the
# install fails, the tests that need them skip and say why: shellcheck (the deploy checks,
# tests/integration/test_deploy.py); nftables and iproute2 (network faults made by the
# kernel, tests/integration/test_network_faults.py and test_isolated_network_faults.py).
# systemd-analyze comes with the systemd package, which is not ours to install into a
# machine: where it is missing its check skips too.
tools:
	@for tool in shellcheck:shellcheck nft:nftables ip:iproute2 tc:iproute2; do \
	  cmd=$${tool%%:*}; pkg=$${tool#*:}; \
	  command -v $$cmd >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1; } \
	      || echo "note: apt-get could not install $$pkg; the tests that need $$cmd will skip"; \
	  else \
	    echo "note: $$cmd is not installed (needs root and apt-get here); the tests that need it will skip"; \
	  fi; \
	done
	@command -v systemd-analyze >/dev/null 2>&1 \
	  || echo "note: systemd-analyze is not installed; the unit-file check will skip"

# The whole suite but the long fault-injection runs (marked slow): under 10 minutes on 2 cores.
test: install tools
	$(BIN)/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

# The long fault-injection runs; CI runs them after `make test`.
test-slow: install
	$(BIN)/python -m pytest -m "slow and not soak" --durations=15 $(PYTEST_ARGS)

# Every fault and every class of bad input, slow runs included; prints the table the
# README shows (trials and outcome per category) and keeps it in .faults.md.
FAULT_TESTS := tests/integration/test_daemon_faults.py tests/integration/test_fuzz.py \
	tests/integration/test_crash_recovery.py tests/integration/test_cluster.py \
	tests/integration/test_bad_input.py tests/integration/test_peer_auth.py \
	tests/integration/test_rogue.py tests/integration/test_peer_tls.py \
	tests/integration/test_verify.py tests/integration/test_tier.py \
	tests/integration/test_soak.py tests/integration/test_hostile_local.py \
	tests/integration/test_network_faults.py tests/integration/test_job_config.py \
	tests/integration/test_placement_restore.py tests/integration/test_torchrun.py \
	tests/integration/test_ddp.py tests/integration/test_isolated_network_faults.py \
	tests/integration/test_integrations_resume.py
faults: install
	rm -f .faults.jsonl
	SHARDGUARD_FAULT_REPORT=$(CURDIR)/.faults.jsonl $(BIN)/python -m pytest -q $(FAULT_TESTS) $(PYTEST_ARGS)
	$(BIN)/python tests/fault_table.py .faults.jsonl | tee .faults.md

demo: install
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q -c constraints.txt -e '.[demo]'
	$(BIN)/python examples/demo.py

bench: install
	$(BIN)/python bench/run_all.py

# The peers' table (bench/bench_peers.py; bench/results/peers.json): shardguard against DLRover
# flash checkpoint, ml-flashpoint, NVRx local checkpointing, torchft's transports and DCP, in
# rotating rounds on one state. Each peer gets a venv of its own under .bench-venvs/ (torch
# 2.13.0 first, pinned by constraints.txt, then the peer at a pinned version with the shims
# bench/peers/requirements/ explains), created or updated here; a peer that cannot be installed
# or run is a row that says why. On 2 cores: about 25 minutes the first time (ml-flashpoint
# builds its C++ from source), 15 after.
.PHONY: bench-peers
bench-peers: install
	$(BIN)/python bench/bench_peers.py --install

# The CUDA path, on a machine with a GPU (under 8 minutes): the CUDA tests, then a short
# benchmark (device-to-host copy into the arena against pinned cudaMemcpy; the step time of
# a small GPT with a snapshot every step against none) into bench/results/gpu.json.
gpu: install
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
	  'make gpu needs CUDA: torch ' + torch.__version__ + ' sees no GPU on this machine')"
	$(BIN)/python -m pytest -m gpu --durations=10 tests/integration/test_cuda.py $(PYTEST_ARGS)
	$(BIN)/python bench/bench_gpu.py --require-cuda

clean:
	rm -rf $(VENV) build *.egg-info proto/*_pb2*.py
