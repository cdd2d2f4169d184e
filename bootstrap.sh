#!/usr/bin/env bash
# Set up everything RadOnc Backup needs on Debian (run as root), then run the demo or the tests.
#   bash bootstrap.sh demo    # Orthanc pair + synthetic clinic + incremental backup via Prefect
#   bash bootstrap.sh test    # the whole test suite
#   bash bootstrap.sh setup   # install only (servers: see docs/operations.md)
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(orthanc dcmtk dicom3tools unixodbc libsqliteodbc odbc-postgresql postgresql
              libicu-dev pkg-config g++ python3-dev)
# libicu-dev, pkg-config, g++, python3-dev: PyICU (the report's collation) is built from source
# against Debian's ICU the first time (pip keeps the wheel it built).
# postgresql and odbc-postgresql: the Mosaiq tests' real database server (refused login, down)
if [[ "${1:-}" == test ]]; then
  # The print tests: headless Chromium prints the report and the sheets to PDF, pdftotext reads
  # them back.
  APT_PACKAGES+=(chromium poppler-utils fonts-dejavu-core)
fi
PYTHON=${PYTHON:-python3}

need_root() { if [[ $(id -u) -ne 0 ]]; then echo "sudo"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then missing+=(python3-venv); fi
if ((${#missing[@]})); then
  echo "Installing Debian packages: ${missing[*]}"
  $(need_root) apt-get update -q
  DEBIAN_FRONTEND=noninteractive $(need_root) apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
if [[ ! -x .venv/bin/python ]]; then "$PYTHON" -m venv .venv; fi
# Install from the lock: every package of the tree pinned with its hash (requirements.txt to run,
# requirements-test.txt to run and test; see requirements.in for how they are made). Whatever the
# venv holds that the lock does not name is removed, so the venv is exactly the lock; `pip check`
# then proves the lock complete (--no-deps: pip takes nothing the lock does not name).
lock=requirements.txt
if [[ "${1:-}" == test ]]; then lock=requirements-test.txt; fi
# The stamp names the lock the venv was installed from, with its hash: another lock asked for
# (demo after test, test after demo) or a changed one reinstalls, so the venv is always exactly
# the lock of the command that runs.
stamp=.venv/.lock.sha256
if ! { [[ -f "$stamp" ]] && [[ "$(awk '{print $2}' "$stamp")" == "$lock" ]] \
       && sha256sum --status -c "$stamp" 2>/dev/null; }; then
  echo "Installing Python packages from $lock (pinned, with hashes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$lock"
  extra=$(.venv/bin/python - "$lock" <<'PY'
import re, subprocess, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(m[1]) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", open(sys.argv[1]).read(), re.M)}
frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True,
                        text=True, check=True).stdout.split()
print(" ".join(n for n in (l.split("==")[0] for l in frozen if "==" in l)
               if norm(n) not in locked and norm(n) not in {"pip", "setuptools", "wheel"}))
PY
)
  if [[ -n "$extra" ]]; then .venv/bin/python -m pip uninstall -q -y $extra; fi
  .venv/bin/python -m pip check
  sha256sum "$lock" > "$stamp"
fi

export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 TCP_NODELAY=1
case "${1:-}" in
  demo) shift; exec .venv/bin/python -m demo "$@" ;;
  test) shift; exec .venv/bin/python -m pytest "$@" ;;
  setup) echo "Installed: $(pwd)/.venv" ;;
  *) echo "usage: bash bootstrap.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
