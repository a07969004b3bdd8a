# Quick start: `make run` (daemon with embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test bench bench-overhead clean install uninstall dashboards deb

$(BIN)/carbond: pyproject.toml
	scripts/setup-venv.sh $(PYTHON) $(VENV)
	@touch $@

run: $(BIN)/carbond
	$(BIN)/carbond run $(ARGS)

test: $(BIN)/carbond
	scripts/test-deps.sh
	$(BIN)/ruff check carbond tests benchmarks
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(BIN)/carbond
	$(BIN)/python benchmarks/tick.py

# As root: real cgroups and processes; see benchmarks/README.md. ARGS="--matrix", "--soak 30m".
bench-overhead: $(BIN)/carbond
	scripts/test-deps.sh
	$(BIN)/python benchmarks/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

# ---- install (README "Install") -------------------------------------------------------------
# carbond in its own virtual environment under PREFIX, the systemd unit, and a commented sample
# configuration that never replaces an existing one. DESTDIR stages everything under another
# root (packaging, tests); the paths written into the unit are those without DESTDIR.
# INSTALL_VENV=no lays out the unit and configuration only (the venv step needs PyPI).
PREFIX ?= /opt/carbond
SYSCONFDIR ?= /etc
UNITDIR ?= $(SYSCONFDIR)/systemd/system
CONFDIR ?= $(SYSCONFDIR)/carbond
INSTALL_VENV ?= yes
DESTDIR ?=

install:
ifeq ($(INSTALL_VENV),yes)
	[ -x "$(DESTDIR)$(PREFIX)/bin/python" ] || $(PYTHON) -m venv "$(DESTDIR)$(PREFIX)"
	"$(DESTDIR)$(PREFIX)/bin/python" -m pip install -q --upgrade pip
	"$(DESTDIR)$(PREFIX)/bin/python" -m pip install -q --upgrade --no-cache-dir .
ifneq ($(DESTDIR),)
# the scripts and pyvenv.cfg name the staging path: point them at the final one
	grep -rlI -- "$(DESTDIR)$(PREFIX)" "$(DESTDIR)$(PREFIX)/bin" "$(DESTDIR)$(PREFIX)/pyvenv.cfg" \
		| xargs -r sed -i "s|$(DESTDIR)$(PREFIX)|$(PREFIX)|g"
endif
endif
	install -d -m 0755 "$(DESTDIR)$(PREFIX)/share/carbond" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(CONFDIR)"
	install -m 0644 deploy/carbond.yaml README.md docs/deploy.md "$(DESTDIR)$(PREFIX)/share/carbond/"
	sed -e "s|/opt/carbond|$(PREFIX)|g" -e "s|/etc/carbond|$(CONFDIR)|g" \
		deploy/systemd/carbond.service > "$(DESTDIR)$(UNITDIR)/carbond.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/carbond.service"
	[ -e "$(DESTDIR)$(CONFDIR)/carbond.yaml" ] || \
		install -m 0644 deploy/carbond.yaml "$(DESTDIR)$(CONFDIR)/carbond.yaml"
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
		echo "installed; start with: systemctl enable --now carbond"; \
	fi

# Leaves the configuration and the state directory (the ledger): README says how to purge them.
uninstall:
	@case "$(PREFIX)" in */carbond) ;; *) echo "refusing to remove PREFIX=$(PREFIX)" >&2; exit 1;; esac
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
		systemctl disable --now carbond.service || true; \
	fi
	rm -f "$(DESTDIR)$(UNITDIR)/carbond.service"
	rm -rf "$(DESTDIR)$(PREFIX)"
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
	fi

# deploy/grafana/*.json from deploy/grafana/dashboards.py (tests check they are in step).
dashboards: $(BIN)/carbond
	$(BIN)/python deploy/grafana/dashboards.py

# dist/carbond_<version>_<arch>.deb: carbond and every dependency in a venv under /opt/carbond
# on Debian's python3, the unit, the sample configuration as a conffile (docs/deploy.md,
# "Debian package"). Needs dpkg-dev and python3-venv; fetches the wheels, so PyPI, at build
# time only. VERSION_SUFFIX=+test2 makes a newer build of the same code; DEB_VERSION sets all.
deb:
	VERSION_SUFFIX="$(VERSION_SUFFIX)" DEB_VERSION="$(DEB_VERSION)" scripts/build-deb.sh
