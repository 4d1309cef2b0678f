# Shared set-up steps for scripts/test and scripts/demo (sourced, not run).
# The application lives in its own virtual environment: $EDGE_AGENT_VENV or ./.venv.
VENV="${EDGE_AGENT_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

die() { echo "error: $*" >&2; exit 1; }

is_root() { [ "$(id -u)" = "0" ]; }

apt_install() {
  # Debian/Ubuntu only; other systems get a message naming the packages.
  if is_root && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  else
    die "missing system packages; install them first: sudo apt-get install $*"
  fi
}

ensure_python_venv() {
  command -v "$PYTHON" >/dev/null 2>&1 || die "python3 (3.11 or newer) is required"
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "python 3.11 or newer is required, found $("$PYTHON" --version 2>&1)"
  # Debian's python3 ships without venv/ensurepip until python3-venv is installed.
  if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    ver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install "python${ver}-venv" || apt_install python3-venv
  fi
}

find_pg_bin() {
  # The PostgreSQL server binaries: $EDGE_AGENT_PG_BIN, $PATH, or Debian's versioned folder.
  if [ -n "${EDGE_AGENT_PG_BIN:-}" ] && [ -x "$EDGE_AGENT_PG_BIN/initdb" ]; then echo "$EDGE_AGENT_PG_BIN"; return 0; fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  return 1
}

has_program() {
  # On PATH, or in the sbin folders a non-root PATH may leave out.
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]
}

ensure_system_packages() {
  # The tests' own peers, each started privately on free ports (never the system services):
  # mosquitto and PostgreSQL; the interop matrix's brokers nobody here wrote: nats-server,
  # RabbitMQ (its MQTT plugin ships in the package; the start script is under
  # /usr/lib/rabbitmq), and node + npm for aedes (ensure_test_brokers); and below, Chromium,
  # the bench's libmodbus server and fuse3 (libfuse3 and fusermount3) for the power-cut
  # harness (tests/fixtures/powercut.py, through mfusepy).
  local missing=()
  has_program mosquitto || missing+=(mosquitto)
  find_pg_bin >/dev/null || missing+=(postgresql)
  has_program nats-server || missing+=(nats-server)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
  has_program node || missing+=(nodejs)
  has_program npm || missing+=(npm)
  # The status page's browser tests (tests/test_page.py): Debian's Chromium and its driver.
  has_program chromium || missing+=(chromium)
  has_program chromedriver || missing+=(chromium-driver)
  # bench/nodered_job.py's Modbus server (tests/fixtures/libmodbus_server.c; the bench smoke
  # test builds and runs it).
  has_program cc || missing+=(gcc)
  has_program pkg-config || missing+=(pkg-config)
  [ -f /usr/include/modbus/modbus.h ] || missing+=(libmodbus-dev)
  # The power-cut harness (tests/fixtures/powercut.py).
  has_program fusermount3 || missing+=(fuse3)
  if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

ensure_test_brokers() {
  # aedes (npm) for the interop matrix, into ./.cache/brokers, and the Eclipse Tahu Sparkplug B
  # payload library (npm), the Sparkplug tests' independent decoder, into ./.cache/sparkplug.
  ensure_npm_dir brokers aedes "the test brokers"
  ensure_npm_dir sparkplug sparkplug-payload "the Sparkplug B payload library"
}

ensure_npm_dir() {
  # tests/$1's package into ./.cache/$1 (gitignored), exactly as its package-lock.json pins
  # it; redone only when that lockfile changes. $2: a module that must be there; $3: its name.
  local src="$PWD/tests/$1" dir="$PWD/.cache/$1"
  local want have=""
  want="$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -d' ' -f1)"
  [ -f "$dir/.installed" ] && have="$(cat "$dir/.installed")"
  if [ "$have" = "$want" ] && [ -d "$dir/node_modules/$2" ]; then
    return 0
  fi
  echo "==> installing $3 from npm into $dir"
  mkdir -p "$dir"
  cp "$src/package.json" "$src/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error) \
    || die "npm could not install $3 (tests/$1/package.json)"
  echo "$want" > "$dir/.installed"
}

ensure_venv() {
  # Create or reuse the venv; reinstall only when pyproject.toml changed.
  local spec="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.edge-agent-installed"
  local want
  want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $spec"
  local have=""
  [ -f "$stamp" ] && have="$(cat "$stamp")"
  # A venv set up for the tests also serves the demo (".[test]" includes ".[demo]").
  if [ "$spec" = ".[demo]" ] && [ "${have% *}" = "${want% *}" ] && [ "${have##* }" = ".[test]" ]; then
    return 0
  fi
  if [ "$have" != "$want" ]; then
    echo "==> installing $spec into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$spec"
    echo "$want" > "$stamp"
  fi
}
