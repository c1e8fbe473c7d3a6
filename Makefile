# One source of truth for every command: CI (.ci/run) and people call these targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Benchmarks are pinned to one core; the load generators of the macro benches take the other.
BENCH_CPU ?= 1
# Seconds per fuzz target in fuzz-quick.
FUZZ_SECONDS ?= 30

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: system-deps
system-deps: ## Install the Debian packages the tests, demo and benchmarks use (needs root)
	@missing=""; for b in knotd:knot dnsperf:dnsperf dnsdist:dnsdist nft:nftables ip:iproute2; do \
		command -v $${b%%:*} >/dev/null || [ -x /usr/sbin/$${b%%:*} ] || missing="$$missing $${b#*:}"; done; \
	[ -e /usr/lib/x86_64-linux-gnu/libnftables.so.1 ] || [ -e /usr/lib/aarch64-linux-gnu/libnftables.so.1 ] || missing="$$missing libnftables1"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

.PHONY: deps
deps: ## Install the Python tools the build, tests and benchmarks use
	$(PIP) install -q --disable-pip-version-check 'maturin>=1.7,<2' 'pytest>=8' 'hypothesis>=6.100' \
		'pytest-benchmark>=4' 'dnspython>=2.6' 'ruff>=0.6' 'mypy>=1.10' 'pyyaml>=6' 'uvloop>=0.19' \
		'prometheus_client>=0.20' 'matplotlib>=3.7' 'cryptography>=42'

.PHONY: build-dev
build-dev: ## Build the extension in release mode and install the package (editable)
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e .

.PHONY: build
build: ## Build a release wheel into dist/
	maturin build --release --out dist


.PHONY: demo
demo: system-deps deps build-dev ## The main job on this machine: Knot upstream, fqdnguard run, allowed and denied queries
	$(PYTHON) examples/demo.py

.PHONY: test
test: system-deps deps build-dev ## Build, then run the Rust and Python tests
	cargo test --all-targets
	$(PYTHON) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The local Kubernetes control plane (tools/kube, docs/kubernetes.md): etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler built from the Go module proxy once per machine and
# cached under ${XDG_CACHE_HOME:-~/.cache}/fqdnguard/kube/, keyed by the versions.
KUBE := $(PYTHON) tools/kube/localkube.py

.PHONY: kube-build
kube-build: ## Build the local control plane's binaries from the Go module proxy (once per machine)
	$(KUBE) build

.PHONY: kube-up
kube-up: kube-build ## Start etcd, kube-apiserver, kube-controller-manager on loopback: KUBE_DIR=D (D/admin.kubeconfig)
	@test -n "$(KUBE_DIR)" || { echo "usage: make kube-up KUBE_DIR=DIR" >&2; exit 2; }
	$(KUBE) up $(KUBE_DIR)

.PHONY: kube-down
kube-down: ## Stop the control plane started with the same KUBE_DIR (its data stays there)
	@test -n "$(KUBE_DIR)" || { echo "usage: make kube-down KUBE_DIR=DIR" >&2; exit 2; }
	$(KUBE) down $(KUBE_DIR)

.PHONY: lint
lint: ## clippy, rustfmt, ruff, and stubtest of the compiled module
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo fmt --check
	ruff check python tests benches examples tools
	ruff format --check python tests benches examples tools
	$(PYTHON) -m mypy.stubtest fqdnguard._core
	$(PYTHON) -m mypy python/fqdnguard tools/kube/localkube.py

.PHONY: format
format: ## Format Rust and Python sources
	cargo fmt
	ruff format python tests benches tools
	ruff check --fix python tests benches tools

# One interpreter per bench module, so that no module measures another's leftovers. (Three
# runs with the cache module first in the same process had the pattern module at half speed,
# 29 -> 58 us per 256 names; an hour later that did not reproduce, so host noise is as likely.)
BENCH_MODULES = $(sort $(wildcard benches/test_bench_*.py))

.PHONY: bench
bench: build-dev ## Full benchmarks, pinned to one core (criterion, then pytest-benchmark)
	taskset -c $(BENCH_CPU) cargo bench
	for m in $(BENCH_MODULES); do \
		taskset -c $(BENCH_CPU) $(PYTHON) -m pytest $$m -p no:cacheprovider --benchmark-only \
			--benchmark-columns=min,median,max,rounds || exit 1; \
	done

.PHONY: bench-quick
bench-quick: build-dev ## Every benchmark once in a short mode (what CI runs so benches never rot)
	taskset -c $(BENCH_CPU) cargo bench -- --warm-up-time 0.2 --measurement-time 0.5
	for m in $(BENCH_MODULES); do \
		FQDNGUARD_BENCH_QUICK=1 taskset -c $(BENCH_CPU) $(PYTHON) -m pytest $$m -p no:cacheprovider \
			--benchmark-only --benchmark-max-time=0.1 --benchmark-min-rounds=3 \
			--benchmark-columns=min,median,max,rounds || exit 1; \
	done
	$(PYTHON) benches/proxy/run.py --quick
	$(PYTHON) benches/proxy/nft_vs_log.py --quick
	$(PYTHON) benches/forgery.py --quick

.PHONY: bench-proxy
bench-proxy: system-deps build-dev ## dnsperf: upstream, bare relay, fqdnguard, dnsdist, dnspython proxy side by side
	$(PYTHON) benches/proxy/run.py

.PHONY: fuzz-quick
fuzz-quick: ## Short coverage-guided fuzz run of the wire parser and builders (FUZZ_SECONDS per target)
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	for t in parse roundtrip; do \
		RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

.PHONY: bench-nft
bench-nft: build-dev ## nftables backend: latency from new IPs to the kernel set (needs root)
	taskset -c $(BENCH_CPU) $(PYTHON) benches/nft/run.py

.PHONY: bench-nft-proxy
bench-nft-proxy: system-deps build-dev ## dnsperf: the proxy's qps with the nftables backend vs the log backend (needs root)
	$(PYTHON) benches/proxy/nft_vs_log.py
