# Two commands on a fresh Debian machine (as root):
#   make run    install what is needed, write a demo config, create a demo vfolder, serve
#   make test   install everything and run the whole test suite (.ci/run calls exactly this)
PYTHON ?= python3
VENV   ?= .venv
DEMO   ?= $(CURDIR)/demo
APT_PACKAGES = fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv redis-server \
               btrfs-progs xfsprogs attr bindfs psmisc util-linux iproute2 procps
DEMO_ID = 6f1c2a3e-0000-4000-8000-00000000d3e0

PREFIX ?= /opt/vfusefs
BINDIR ?= /usr/local/bin
ETCDIR ?= /etc/vfusefs
UNITDIR ?= /etc/systemd/system

.PHONY: run test deps venv bench clean install

deps:
	@if command -v apt-get >/dev/null && ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); fi

$(VENV)/.installed: setup.cfg setup.py pyproject.toml $(wildcard src/vfusefs/shim/*.c)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

run: venv
	@mkdir -p $(DEMO)/native $(DEMO)/state
	@test -f $(DEMO)/vfusefs.toml || sed -e 's|@DEMO@|$(DEMO)|g' examples/demo.toml > $(DEMO)/vfusefs.toml
	@echo "config: $(DEMO)/vfusefs.toml   mount: /mnt/vfroot   (Ctrl-C unmounts and exits)"
	@( for i in $$(seq 100); do $(VENV)/bin/vfusefs --config $(DEMO)/vfusefs.toml status >/dev/null 2>&1 && break; sleep 0.2; done; \
	   $(VENV)/bin/vfusefs --config $(DEMO)/vfusefs.toml vfolder info local $(DEMO_ID) >/dev/null 2>&1 || \
	   $(VENV)/bin/vfusefs --config $(DEMO)/vfusefs.toml vfolder create local --id $(DEMO_ID) --grant '*=rwd'; \
	   echo "demo vfolder: /mnt/vfroot/local/$(DEMO_ID)" ) & \
	exec $(VENV)/bin/vfusefs serve --config $(DEMO)/vfusefs.toml

test: venv
	$(VENV)/bin/mypy src/
	$(VENV)/bin/python -m pytest -q tests

bench: venv
	$(VENV)/bin/python bench/run.py

# a node install: the daemon in its own venv, the unit, and an example config if none exists
install: deps
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --upgrade pip
	$(PREFIX)/bin/pip install -q .
	install -d $(BINDIR) $(UNITDIR) $(ETCDIR)
	ln -sf $(PREFIX)/bin/vfusefs $(BINDIR)/vfusefs
	test -f $(ETCDIR)/vfusefs.toml || install -m 0644 examples/vfs.toml $(ETCDIR)/vfusefs.toml
	sed -e 's|/usr/local/bin/vfusefs|$(BINDIR)/vfusefs|; s|/etc/vfusefs/vfusefs.toml|$(ETCDIR)/vfusefs.toml|' \
		systemd/vfusefs.service > $(UNITDIR)/vfusefs.service
	@systemctl daemon-reload 2>/dev/null || echo "(systemd is not running here: no daemon-reload)"
	@echo "next: edit $(ETCDIR)/vfusefs.toml, run 'vfusefs doctor', then 'systemctl enable --now vfusefs'"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
