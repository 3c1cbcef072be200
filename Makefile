# kata-rs: `make run` (build, guest image, a private containerd runs a container
# in a VM) and `make test` (every test; installs what a fresh Debian 12 lacks).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
BIN := $(CURDIR)/target/$(TARGET)/release
GUEST_DIR := $(CURDIR)/target/guest
TEST_GUEST_DIR := $(CURDIR)/target/guest-test
# The test image whose agent checks every request against a policy.
POLICY_GUEST_DIR := $(CURDIR)/target/guest-test-policy
# `make image AGENT_POLICY=yes`: Kata's switch. The image gets the agent built
# with the agent-policy feature and the allow-all default policy.
AGENT_POLICY ?= no
# Debian packages the build, the image and the tests need.
APT_PACKAGES := qemu-system-x86 busybox-static ca-certificates g++ containerd iproute2 containernetworking-plugins prometheus tmux systemd dbus python3-venv chromium curl \
  linux-source make flex bison bc libelf-dev xz-utils binutils
export KATA_TEST_BIN_DIR := $(BIN)
export KATA_TEST_GUEST_DIR := $(TEST_GUEST_DIR)
export KATA_GUEST_DIR := $(GUEST_DIR)
export KATA_TEST_POLICY_GUEST_DIR := $(POLICY_GUEST_DIR)
# The guest kernel of the images: `kata-rs` (the default) builds kata-rs's
# own kernel from Debian's linux-source once per machine (cached under
# /var/cache/kata-rs/image) and the images use it; if it cannot be built the
# images get Debian's cloud kernel and make says so. `KERNEL=debian`: Debian's
# cloud kernel (e.g. `make test KERNEL=debian` runs every test on it).
KERNEL ?= kata-rs
export KATA_TEST_KERNEL := $(KERNEL)

.PHONY: all deps build kernel image test-image run boot install test unit lint bench soak fuzz clean docs

all: build

# Installs the missing Debian packages (only those: a warm machine does nothing).
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	if [ -n "$$missing" ] || [ -z "$$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then \
	  echo "refreshing apt's package lists (missing packages or lists older than a day)"; \
	  $$SUDO apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The agent with policy support is kata-agent-policy (built first: the
# workspace build then puts the plain kata-agent back in place).
build:
	$(CARGO) build --release --locked -p kata-agent --features agent-policy
	cp $(BIN)/kata-agent $(BIN)/kata-agent-policy
	$(CARGO) build --release --locked --workspace --bins

ifeq ($(AGENT_POLICY),yes)
IMAGE_AGENT := --agent $(BIN)/kata-agent-policy --policy $(CURDIR)/agent/policy/allow-all.rego
else
IMAGE_AGENT := --agent $(BIN)/kata-agent
endif

# kata-rs's guest kernel (several minutes the first time, then cached).
kernel: deps build
ifeq ($(KERNEL),kata-rs)
	$(BIN)/kata-ctl image kernel || echo "kata-rs: the guest kernel could not be built (see above): the images get Debian's cloud kernel"
endif

ifeq ($(KERNEL),kata-rs)
IMAGE_KERNEL := --kernel auto
else
IMAGE_KERNEL := --kernel debian
endif

image: deps build kernel
	$(BIN)/kata-ctl image build --output $(GUEST_DIR) $(IMAGE_KERNEL) $(IMAGE_AGENT)

# The test image: the agent's image plus the vsock test peer (booted with rdinit=).
# And its twin with the policy agent and the allow-all default policy.
test-image: deps build kernel
	$(BIN)/kata-ctl image build --output $(TEST_GUEST_DIR) $(IMAGE_KERNEL) --agent $(BIN)/kata-agent \
	  --extra $(BIN)/kata-test-guest
	$(BIN)/kata-ctl image build --output $(POLICY_GUEST_DIR) $(IMAGE_KERNEL) --agent $(BIN)/kata-agent-policy \
	  --policy $(CURDIR)/agent/policy/allow-all.rego --extra $(BIN)/kata-test-guest

# One container end to end: a private containerd, the busybox image built
# locally, `ctr run --runtime io.containerd.kata.v2 ... uname -a` (scripts/run.sh).
run: image
	KATA_BIN_DIR=$(BIN) scripts/run.sh

# Installs kata-rs for a containerd the user already runs: the binaries on
# PATH (containerd finds containerd-shim-kata-v2 there), the guest image where
# the default configuration looks for it, and that configuration as the
# packaged default (an /etc/kata-containers/configuration.toml overrides it).
PREFIX ?= /usr/local
DESTDIR ?=
install: image
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/usr/share/kata-rs/guest $(DESTDIR)/usr/share/defaults/kata-containers
	install -m 0755 $(BIN)/containerd-shim-kata-v2 $(BIN)/kata-vmm-launcher $(BIN)/kata-virtiofsd \
	  $(BIN)/kata-netmon $(BIN)/kata-ctl $(BIN)/kata-monitor $(BIN)/kata-trace-forwarder $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initrd.img $(GUEST_DIR)/manifest.json \
	  $(DESTDIR)/usr/share/kata-rs/guest/
	install -m 0644 config/configuration.toml $(DESTDIR)/usr/share/defaults/kata-containers/configuration.toml

# One bare VM under kata-vmm-launcher (no containerd, no shim): the guest's details.
boot: image
	$(BIN)/kata-ctl boot --guest-dir $(GUEST_DIR) --launcher $(BIN)/kata-vmm-launcher

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --locked -p kata-agent --features agent-policy --all-targets -- -D warnings

# The documentation site: mkdocs with the mkdocs-materialx theme (versions
# pinned in docs/requirements.txt, in a virtualenv under target/), strict (a
# broken link or anchor fails), into target/site; the configuration
# reference page is regenerated from the code first. Mermaid (the diagrams)
# is served from the site itself, the pinned release checked by its hash.
DOCS_VENV := $(CURDIR)/target/docs-venv
MERMAID_VERSION := 11.4.1
MERMAID_SHA256 := ec7b61b391aaa24bf666fd20e48d0a626eeb4a95b95bc6b3016a122d7f0bc2af
MERMAID_JS := $(CURDIR)/docs/js/mermaid.min.js
$(DOCS_VENV)/.installed: docs/requirements.txt
	rm -rf $(DOCS_VENV)
	python3 -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install --quiet --disable-pip-version-check -r docs/requirements.txt
	touch $@
$(MERMAID_JS):
	mkdir -p $(dir $@) target/mermaid
	curl -sSfL -o target/mermaid/mermaid.tgz https://registry.npmjs.org/mermaid/-/mermaid-$(MERMAID_VERSION).tgz
	echo "$(MERMAID_SHA256)  target/mermaid/mermaid.tgz" | sha256sum -c --quiet
	tar -xzf target/mermaid/mermaid.tgz -C target/mermaid package/dist/mermaid.min.js
	cp target/mermaid/package/dist/mermaid.min.js $@
docs: deps build $(DOCS_VENV)/.installed $(MERMAID_JS)
	$(BIN)/kata-ctl config-reference --packaged config/configuration.toml > docs/reference/configuration-keys.md.tmp
	mv docs/reference/configuration-keys.md.tmp docs/reference/configuration-keys.md
	$(DOCS_VENV)/bin/mkdocs build --strict --quiet
	@echo "the site is in target/site (open target/site/index.html)"

# Every test: unit tests, then the integration and end-to-end tests (root, QEMU
# under TCG, the real guest image), after the documentation site is built
# (a test looks at it in headless Chromium). One release profile, one build.
test: deps test-image lint docs
	# the vendored fuse-backend-rs (a path dependency, so cargo counts it in the
	# workspace) keeps its own tests out: some assume stdout is a pipe
	$(CARGO) test --release --locked --workspace --exclude fuse-backend-rs -- --test-threads=2
	# the agent built with policy support (a cargo feature, Kata's AGENT_POLICY)
	$(CARGO) test --release --locked -p kata-agent --features agent-policy --lib policy
	# the end-to-end suite once more in guests whose agent checks every
	# request against the image's allow-all policy
	KATA_TEST_GUEST_DIR=$(POLICY_GUEST_DIR) $(CARGO) test --release --locked -p kata-tests \
	  --test shim_e2e -- --test-threads=2

# Fuzzing: libFuzzer targets over the decoders of untrusted input (agent
# requests and OCI specs; the vsock backend's packets; kata-virtiofsd's FUSE
# requests; Prometheus text from a guest or a pod), FUZZ_SECONDS each.
# Coverage instrumentation uses stable rustc flags only (no nightly, no
# cargo-fuzz); libfuzzer-sys builds libFuzzer with g++.
FUZZ_SECONDS ?= 90
FUZZ_TARGETS := agent_request vsock_packet fuse_request metrics_text trace_stream
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks
fuzz: deps
	cd fuzz && RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build --release --locked --bins
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  rm -rf target/fuzz-tmp; mkdir -p target/fuzz-tmp; \
	  TMPDIR=$(CURDIR)/target/fuzz-tmp fuzz/target/$(TARGET)/release/$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=target/fuzz-corpus/$$t- \
	    target/fuzz-corpus/$$t fuzz/seeds/$$t 2>&1 | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss|==|SUMMARY|Done)" ; \
	done; rm -rf target/fuzz-tmp

# Benchmarks (not timed tests): regenerates docs/bench-results.md on this machine.
# Upstream virtiofsd, the reference kata-virtiofsd is measured against (bench only).
UPSTREAM_VIRTIOFSD := $(CURDIR)/target/upstream/bin/virtiofsd
UPSTREAM_VIRTIOFSD_VERSION := 1.14.0
$(UPSTREAM_VIRTIOFSD):
	$(MAKE) deps APT_PACKAGES="libseccomp-dev libcap-ng-dev pkg-config"
	# built outside the tree: our static-linking cargo config is not for it
	cd /tmp && $(CARGO) install --locked --root $(CURDIR)/target/upstream virtiofsd --version $(UPSTREAM_VIRTIOFSD_VERSION)

bench: deps test-image $(UPSTREAM_VIRTIOFSD)
	KATA_UPSTREAM_VIRTIOFSD=$(UPSTREAM_VIRTIOFSD) $(BIN)/kata-bench > docs/bench-results.md.tmp
	mv docs/bench-results.md.tmp docs/bench-results.md
	cat docs/bench-results.md

# The soak (`make test` runs a short one, 20 lifecycles): SOAK_LIFECYCLES
# pod lifecycles, 4 at a time, most with a random fault; fails on any leak,
# hang or unexplained failure and writes the figures to docs/reliability.md.
# KATA_SOAK_SEED repeats a run.
SOAK_LIFECYCLES ?= 200
soak: deps test-image
	KATA_SOAK_LIFECYCLES=$(SOAK_LIFECYCLES) KATA_SOAK_REPORT=$(CURDIR)/docs/reliability.md \
	  $(CARGO) test --release --locked -p kata-tests --test soak -- --nocapture

unit:
	$(CARGO) test --release --locked --workspace --exclude fuse-backend-rs --lib --bins

clean:
	$(CARGO) clean
