# One source of truth for every command: CI (.ci/run) and people call these targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
# Everything Python goes into the project's own virtual environment, made from the machine's
# python3 by `make venv`; the system's Python is never installed into. Point PYTHON at another
# interpreter to use it instead (`make test PYTHON=python3`): then no venv is made.
VENV ?= .venv
BASE_PYTHON ?= python3
PYTHON ?= $(VENV)/bin/python
PIP ?= $(PYTHON) -m pip
# The venv is a prerequisite only when PYTHON lives in it.
VENV_DEP := $(if $(filter $(VENV)/%,$(PYTHON)),$(VENV)/bin/python)
# Benchmarks are pinned to one core; the load generators of the macro benches take the other.
BENCH_CPU ?= 1
# Seconds per fuzz target in fuzz-quick.
FUZZ_SECONDS ?= 30

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# Debian packages as COMMAND:PACKAGE (installed when COMMAND is missing). The demo uses Knot, and
# when run as root also nftables and iproute2 (namespaces, the nftables backend); the tests and
# benchmarks use dnsperf and dnsdist besides.
DEMO_DEBS := knotd:knot $(if $(filter 0,$(shell id -u)),nft:nftables ip:iproute2 lib:libnftables1)
TEST_DEBS := knotd:knot nft:nftables ip:iproute2 lib:libnftables1 dnsperf:dnsperf dnsdist:dnsdist \
	kresd:knot-resolver
# $(1): the COMMAND:PACKAGE pairs. python3-venv (ensurepip) too when the venv is still to make.
define install_debs
	@missing=""; for b in $(1); do c=$${b%%:*}; \
		if [ "$$c" = lib ]; then ls /usr/lib/*-linux-gnu/libnftables.so.1 >/dev/null 2>&1 && continue; \
		elif command -v $$c >/dev/null || [ -x /usr/sbin/$$c ]; then continue; fi; \
		missing="$$missing $${b#*:}"; done; \
	if [ -n "$(VENV_DEP)" ] && [ ! -x "$(VENV_DEP)" ] && ! $(BASE_PYTHON) -c 'import ensurepip' 2>/dev/null; then \
		missing="$$missing python3-venv"; fi; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)" >&2; exit 1; fi; \
	echo "installing:$$missing"; \
	DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null
endef

.PHONY: system-deps
system-deps: ## Install the Debian packages the tests and benchmarks use (needs root)
	$(call install_debs,$(TEST_DEBS))

.PHONY: demo-deps
demo-deps: ## Install the Debian packages the demo uses: knot (and nftables, iproute2 as root)
	$(call install_debs,$(DEMO_DEBS))

$(VENV)/bin/python:
	$(BASE_PYTHON) -m venv --upgrade-deps $(VENV)

.PHONY: venv
venv: $(VENV_DEP) ## Make the project's virtual environment (.venv) with the machine's python3

# Python packages: what the demo uses (maturin builds the extension; build-dev brings the
# package's own dependencies), and everything the tests, linters and benchmarks use besides.
DEMO_PY := 'maturin>=1.7,<2' 'dnspython>=2.6'
# The local Kubernetes control plane makes its certificates with cryptography (tools/kube).
KUBE_PY := 'cryptography>=42'
DEV_PY := $(DEMO_PY) 'pytest>=8' 'hypothesis>=6.100' 'pytest-benchmark>=4' 'ruff>=0.6' \
	'mypy>=1.10' 'pyyaml>=6' 'uvloop>=0.19' 'prometheus_client>=0.20' 'matplotlib>=3.7' $(KUBE_PY)

.PHONY: deps
deps: $(VENV_DEP) ## Install the Python tools the build, tests and benchmarks use (into .venv)
	$(PIP) install -q --disable-pip-version-check $(DEV_PY)

.PHONY: demo-pydeps
demo-pydeps: $(VENV_DEP)
	$(PIP) install -q --disable-pip-version-check $(DEMO_PY)

.PHONY: build-dev
build-dev: $(VENV_DEP) ## Build the extension in release mode and install the package (editable, into .venv)
	@command -v cargo >/dev/null || { echo "building the extension needs a Rust toolchain (cargo): https://rustup.rs" >&2; exit 1; }
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e .

.PHONY: build
build: $(VENV_DEP) ## Build a release wheel into dist/
	$(PYTHON) -m maturin build --release --out dist


.PHONY: demo
demo: demo-deps demo-pydeps build-dev ## The main job on this machine: Knot upstream, fqdnguard run, allowed and denied queries
	$(PYTHON) examples/demo.py

.PHONY: test
test: system-deps deps build-dev ## Build, then run the Rust and Python tests
	cargo test --all-targets
	$(PYTHON) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The local Kubernetes control plane (tools/kube, docs/kubernetes.md): etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler built from the Go module proxy once per machine and
# cached under ${XDG_CACHE_HOME:-~/.cache}/fqdnguard/kube/, keyed by the versions.
KUBE := $(PYTHON) tools/kube/localkube.py

# The previous release, for the upgrade and rollback test between versions (tools/baseline.py):
# the commit in tests/upgrade_baseline.txt, exported from git history and built once per commit.
.PHONY: baseline-build
baseline-build: ## Build the previous release (tests/upgrade_baseline.txt) for the upgrade test between versions
	python3 tools/baseline.py build

.PHONY: kube-build
kube-build: $(VENV_DEP) ## Build the local control plane's binaries from the Go module proxy (once per machine)
	$(KUBE) build

.PHONY: cilium-module
cilium-module: $(VENV_DEP) ## Fetch the Cilium Go module the CRD oracle test compares with (once per machine, ~5 s)
	$(PYTHON) tools/cilium/module.py fetch

.PHONY: kube-pydeps
kube-pydeps: $(VENV_DEP)
	$(PIP) install -q --disable-pip-version-check $(KUBE_PY)

.PHONY: kube-up
kube-up: $(if $(VENV_DEP),kube-pydeps) kube-build ## Start etcd, kube-apiserver, kube-controller-manager on loopback: KUBE_DIR=D (D/admin.kubeconfig)
	@test -n "$(KUBE_DIR)" || { echo "usage: make kube-up KUBE_DIR=DIR" >&2; exit 2; }
	$(KUBE) up $(KUBE_DIR)

.PHONY: demo-kubernetes
DEMO_KUBE_DIR ?= .demo-kube
demo-kubernetes: demo-deps demo-pydeps build-dev ## fqdnguard following a local control plane (make kube-up): pods, policies, a change, an invalid policy
	$(MAKE) kube-up KUBE_DIR=$(DEMO_KUBE_DIR)
	$(PYTHON) examples/demo_kubernetes.py $(DEMO_KUBE_DIR); rc=$$?; $(MAKE) kube-down KUBE_DIR=$(DEMO_KUBE_DIR); exit $$rc

# Go programs the tests and benchmarks run against (tools/gobuild.py): Cilium's matchpattern as
# the oracle of tests/test_matchpattern_oracle.py, and the peers of benches/peers. Built once per
# machine into ${XDG_CACHE_HOME:-~/.cache}/fqdnguard/go/, keyed by a digest of their sources.
.PHONY: go-build
go-build: ## Build the Go oracle and peers from the Go module proxy (once per machine)
	$(BASE_PYTHON) tools/gobuild.py build

.PHONY: kube-down
kube-down: $(VENV_DEP) ## Stop the control plane started with the same KUBE_DIR (its data stays there)
	@test -n "$(KUBE_DIR)" || { echo "usage: make kube-down KUBE_DIR=DIR" >&2; exit 2; }
	$(KUBE) down $(KUBE_DIR)

# The deployment (docs/deploy.md): helm and kubectl built from the Go module proxy once per
# machine (cached under ${XDG_CACHE_HOME:-~/.cache}/fqdnguard/helm/, keyed by the versions); the
# manifests generated from the Helm chart; the image built with buildah from a local Debian base.
HELM_TOOLS := $(PYTHON) tools/helm/build.py
IMAGE_DEBS := debootstrap:debootstrap buildah:buildah podman:podman runc:runc knotd:knot ip:iproute2

.PHONY: helm-build
helm-build: $(VENV_DEP) ## Build helm and kubectl from the Go module proxy (once per machine)
	$(HELM_TOOLS) build

.PHONY: manifests
manifests: helm-build ## Regenerate deploy/kubernetes/*.yaml and the chart's crds/ from the Helm chart
	$(PYTHON) tools/helm/manifests.py

.PHONY: image-deps
image-deps: ## Install the Debian packages the image build and check use (needs root)
	$(call install_debs,$(IMAGE_DEBS))

.PHONY: image
image: image-deps $(VENV_DEP) ## Build the image (wheel by maturin, buildah), check it with podman, save an OCI archive
	$(PYTHON) tools/image/image.py all

.PHONY: lint
lint: ## clippy, rustfmt, ruff, and stubtest of the compiled module
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo fmt --check
	$(PYTHON) -m ruff check python tests benches examples tools
	$(PYTHON) -m ruff format --check python tests benches examples tools
	$(PYTHON) -m mypy.stubtest fqdnguard._core
	$(PYTHON) -m mypy python/fqdnguard tools/kube/localkube.py
	$(PYTHON) -m mypy --explicit-package-bases tools/helm/build.py tools/helm/manifests.py tools/image/image.py

.PHONY: format
format: ## Format Rust and Python sources
	cargo fmt
	$(PYTHON) -m ruff format python tests benches examples tools
	$(PYTHON) -m ruff check --fix python tests benches examples tools

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
	FQDNGUARD_BENCH_QUICK=1 taskset -c $(BENCH_CPU) $(PYTHON) benches/nft/peers.py
	$(PYTHON) benches/peers/run.py --quick --json benches/peers/results/quick-summary.json

.PHONY: bench-proxy
bench-proxy: system-deps build-dev ## dnsperf: upstream, bare relay, fqdnguard, dnsdist, dnspython proxy side by side
	$(PYTHON) benches/proxy/run.py

.PHONY: fuzz-quick
fuzz-quick: ## Short coverage-guided fuzz run of the wire parser and builders (FUZZ_SECONDS per target)
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	for t in parse roundtrip; do \
		RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

.PHONY: bench-peers
bench-peers: system-deps build-dev go-build ## fqdnguard beside dnsdist, Knot Resolver, Blocky with the same rules and load (root: nftables too)
	$(PYTHON) benches/peers/run.py

.PHONY: bench-nft
bench-nft: build-dev ## nftables backend: latency from new IPs to the kernel set (needs root)
	taskset -c $(BENCH_CPU) $(PYTHON) benches/nft/run.py

.PHONY: bench-nft-peers
bench-nft-peers: build-dev ## nftables backend: one peer address changes, 100 and 1,000 endpoints; BEFORE=<checkout>/python compares (needs root)
	taskset -c $(BENCH_CPU) $(PYTHON) benches/nft/peers.py $(if $(BEFORE),--before $(BEFORE))

.PHONY: bench-nft-proxy
bench-nft-proxy: system-deps build-dev ## dnsperf: the proxy's qps with the nftables backend vs the log backend (needs root)
	$(PYTHON) benches/proxy/nft_vs_log.py
