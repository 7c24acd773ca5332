#!/usr/bin/env bash
# Set up everything the toolkit needs; idempotent, and quick when nothing changed.
#   scripts/setup.sh          Python venv (.venv), pinned packages, the Node packages of the TF.js runner
#   scripts/setup.sh --test   the same, plus Chromium and OpenSSH's server for the browser and SSH tests,
#                             and the kfp SDK's tool environment (.venv-kfp)
#   scripts/setup.sh --kfp    the same as the first, plus the kfp SDK's tool environment
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
say() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

# Re-install only when a requirements file or this script changed.
stamp=$(cat requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" != "$stamp" ]; then
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "pip==25.3"
  # torch first and alone: the CPU build lives on PyTorch's own index, which must not take part in
  # the big resolve below (an unreachable index costs seconds per package name).
  if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
    say "installing torch 2.13.0+cpu"
    "${pip[@]}" --no-deps --retries 0 --timeout 10 "torch==2.13.0+cpu" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  say "installing pinned Python packages (a few minutes on a fresh machine)"
  "${pip[@]}" -r requirements.txt -c constraints.txt
  "${pip[@]}" --no-deps -r requirements-nodeps.txt
  "${pip[@]}" --no-deps --no-build-isolation -e .
  echo "$stamp" > "$VENV/.setup-stamp"
fi

if ! command -v node >/dev/null; then
  say "installing Node.js"
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
js=exporters/js
if [ -f "$js/package-lock.json" ] && { [ ! -f "$js/node_modules/.package-lock.json" ] ||
     [ "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]; }; then
  say "installing the TF.js runner's npm packages"
  npm ci --prefix "$js" --no-audit --no-fund --loglevel=error >/dev/null
fi

# The kfp SDK, for `compile --to kfp`, in a tool environment of its own: kfp 2.17 needs protobuf<7,
# and the toolkit's pins hold 7.x (pipeline/kubeflow.py says why).
if [ "${1:-}" = "--kfp" ] || [ "${1:-}" = "--test" ]; then
  kfp_stamp=$(sha256sum constraints-kfp.txt | cut -c1-16)
  if [ "$(cat .venv-kfp/.setup-stamp 2>/dev/null)" != "$kfp_stamp" ]; then
    say "installing the kfp SDK in .venv-kfp"
    [ -x .venv-kfp/bin/python ] || "$PYTHON" -m venv .venv-kfp
    .venv-kfp/bin/python -m pip install --quiet --disable-pip-version-check "kfp==2.17.3" -c constraints-kfp.txt
    echo "$kfp_stamp" > .venv-kfp/.setup-stamp
  fi
fi

# The tests' own system packages: Chromium for the browser tests, OpenSSH's server (sshd, sftp-server)
# for the SSH transport's device in a network namespace, iproute2 for the namespaces, PostgreSQL for
# the tracking server (Debian's package also creates the unprivileged postgres user it runs as).
if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)  # the tracking server's store
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} for the tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
say "ready"
