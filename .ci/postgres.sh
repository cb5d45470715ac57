# Sourced by .ci/run: start a throwaway PostgreSQL server for the tests of fxqp.search's
# RDB storage, and export its URL as FXQP_TEST_POSTGRES_URL. PostgreSQL is installed with
# apt-get when it is missing. The server listens on a Unix socket in a new temporary folder
# only; it is stopped and the folder removed when the shell that sourced this exits.

_fxqp_pg_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

if ! FXQP_PG_BIN=$(_fxqp_pg_bin); then
  echo "installing PostgreSQL (apt-get) for the storage tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  FXQP_PG_BIN=$(_fxqp_pg_bin)
fi

FXQP_PG_DIR=$(mktemp -d /tmp/fxqp-pg.XXXXXX)
FXQP_PG_AS=()
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$FXQP_PG_DIR"
  FXQP_PG_AS=(runuser -u postgres --)
fi
_fxqp_pg() { ${FXQP_PG_AS[@]+"${FXQP_PG_AS[@]}"} "$@"; }

_fxqp_pg "$FXQP_PG_BIN/initdb" -D "$FXQP_PG_DIR/data" -A trust -U fxqp >/dev/null
_fxqp_pg "$FXQP_PG_BIN/pg_ctl" -D "$FXQP_PG_DIR/data" -l "$FXQP_PG_DIR/server.log" -w \
  -o "-k $FXQP_PG_DIR -c listen_addresses= -p 5432" start >/dev/null
trap '_fxqp_pg "$FXQP_PG_BIN/pg_ctl" -D "$FXQP_PG_DIR/data" -m fast -w stop >/dev/null 2>&1; rm -rf "$FXQP_PG_DIR"' EXIT
_fxqp_pg "$FXQP_PG_BIN/createdb" -h "$FXQP_PG_DIR" -p 5432 -U fxqp fxqp_test
export FXQP_TEST_POSTGRES_URL="postgresql://fxqp@/fxqp_test?host=$FXQP_PG_DIR&port=5432"
echo "PostgreSQL $("$FXQP_PG_BIN/postgres" --version | awk '{print $3}') for the tests at $FXQP_TEST_POSTGRES_URL"
