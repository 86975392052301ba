# Two commands on a fresh Debian machine (as root):
#   make run    install what is needed, write a demo config, create a demo vfolder, serve
#   make test   install everything and run the whole test suite (.ci/run calls exactly this)
PYTHON ?= python3
VENV   ?= .venv
DEMO   ?= $(CURDIR)/demo
# what a node needs to run the daemon (make run, make install) ...
NODE_PACKAGES = fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr util-linux
# ... and what the test suite adds: peers to compare with, real storage (a one-node Ceph
# cluster; a QEMU VM running Debian's kernel for XFS quota), tools it drives
TEST_PACKAGES = redis-server btrfs-progs xfsprogs bindfs psmisc iproute2 procps curl \
	ceph-mon ceph-osd ceph-mds ceph-fuse ceph-common \
	qemu-system-x86 busybox-static kmod cpio
DEMO_ID = 6f1c2a3e-0000-4000-8000-00000000d3e0

# make install [DESTDIR=/tmp/pkgroot] [PREFIX=...]: DESTDIR stages the files for a package
# (no packages installed, no systemctl); the venv is rewritten to run from PREFIX
PREFIX ?= /opt/vfusefs
BINDIR ?= /usr/local/bin
ETCDIR ?= /etc/vfusefs
UNITDIR ?= /etc/systemd/system
MANDIR ?= /usr/local/share/man

.PHONY: run test deps test-deps venv bench clean install

define apt_install
	@if command -v apt-get >/dev/null && ! dpkg -s $(1) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1); fi
endef

deps:
	$(call apt_install,$(NODE_PACKAGES))

test-deps: deps
	$(call apt_install,$(TEST_PACKAGES))

$(VENV)/.installed: setup.cfg setup.py pyproject.toml $(wildcard src/vfusefs/shim/*.c)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

run: venv
	@mkdir -p $(DEMO)/native $(DEMO)/state
	@test -f $(DEMO)/vfusefs.toml || sed -e 's|@DEMO@|$(DEMO)|g' examples/demo.toml > $(DEMO)/vfusefs.toml
	@test -f $(DEMO)/files.key || (umask 077; $(PYTHON) -c 'import secrets; print(secrets.token_hex(32))' > $(DEMO)/files.key)
	@echo "config: $(DEMO)/vfusefs.toml   mount: /mnt/vfroot   file API: 127.0.0.1:6021   (Ctrl-C unmounts and exits)"
	@( for i in $$(seq 100); do $(VENV)/bin/vfusefs --config $(DEMO)/vfusefs.toml status >/dev/null 2>&1 && break; sleep 0.2; done; \
	   $(VENV)/bin/vfusefs --config $(DEMO)/vfusefs.toml vfolder info local $(DEMO_ID) >/dev/null 2>&1 || \
	   $(VENV)/bin/vfusefs --config $(DEMO)/vfusefs.toml vfolder create local --id $(DEMO_ID) --grant '*=rwd'; \
	   echo "demo vfolder: /mnt/vfroot/local/$(DEMO_ID)" ) & \
	exec $(VENV)/bin/vfusefs serve --config $(DEMO)/vfusefs.toml

# promtool (checks examples/prometheus): taken out of Debian's prometheus package into .cache,
# not installed, so no Prometheus server is set up on the machine
PROMTOOL = .cache/prometheus/usr/bin/promtool
$(PROMTOOL):
	@mkdir -p .cache/deb
	@cd .cache/deb && (apt-get download prometheus >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get download prometheus >/dev/null))
	dpkg -x .cache/deb/prometheus_*.deb .cache/prometheus
	@rm -rf .cache/deb

test: test-deps venv $(PROMTOOL)
	$(VENV)/bin/mypy src/
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/python -m pytest -q tests

bench: venv
	$(VENV)/bin/python bench/run.py

# a node install: the daemon in its own venv, the unit, and an example config if none exists
install: $(if $(DESTDIR),,deps)
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/pip install -q .
	@if [ -n "$(DESTDIR)" ]; then \
		grep -rlI -- "$(DESTDIR)$(PREFIX)" $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/pyvenv.cfg \
			| xargs -r sed -i "s|$(DESTDIR)$(PREFIX)|$(PREFIX)|g"; fi
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(ETCDIR) $(DESTDIR)$(MANDIR)/man1
	ln -sf $(PREFIX)/bin/vfusefs $(DESTDIR)$(BINDIR)/vfusefs
	$(DESTDIR)$(PREFIX)/bin/python -m vfusefs man > $(DESTDIR)$(MANDIR)/man1/vfusefs.1
	test -f $(DESTDIR)$(ETCDIR)/vfusefs.toml || install -m 0644 examples/vfs.toml $(DESTDIR)$(ETCDIR)/vfusefs.toml
	sed -e 's|/usr/local/bin/vfusefs|$(BINDIR)/vfusefs|; s|/etc/vfusefs/vfusefs.toml|$(ETCDIR)/vfusefs.toml|' \
		systemd/vfusefs.service > $(DESTDIR)$(UNITDIR)/vfusefs.service
	@if [ -z "$(DESTDIR)" ]; then systemctl daemon-reload 2>/dev/null || \
		echo "(systemd is not running here: no daemon-reload)"; fi
	@echo "next: edit $(ETCDIR)/vfusefs.toml, run 'vfusefs doctor', then 'systemctl enable --now vfusefs'"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
