# Shared by scripts/test and scripts/demo: install what is missing, start a throwaway PostgreSQL and the
# mock Kafka cluster, and tear both down on exit. Source it; it defines functions only.

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root to run: $*  (install it yourself, then rerun)"; return 1; fi
}

pg_bindir() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }; done
    command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

# Installs libpq-dev, librdkafka-dev, postgresql and kcat when any is absent (Debian/Ubuntu).
ensure_packages() {
    local missing=()
    pkg-config --exists libpq 2>/dev/null || missing+=(libpq-dev)
    pkg-config --exists rdkafka 2>/dev/null || missing+=(librdkafka-dev)
    pg_bindir >/dev/null || missing+=(postgresql)
    command -v kcat >/dev/null || missing+=(kcat)
    command -v curl >/dev/null || missing+=(curl)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    # unshare and ip: the mock broker port test runs in a network namespace of its own.
    command -v unshare >/dev/null || missing+=(util-linux)
    command -v ip >/dev/null || missing+=(iproute2)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Starts PostgreSQL in $EO_RUNDIR (unix socket only, fsync on) and exports EVENTOUTBOX_DATABASE_URL.
start_postgres() {
    local bindir run_as=()
    bindir=$(pg_bindir)
    mkdir -p "$EO_RUNDIR/pg"
    if [ "$(id -u)" -eq 0 ]; then
        # PostgreSQL refuses to run as root; CI runs as root, so the server runs as the postgres user.
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
        chown -R postgres "$EO_RUNDIR/pg"
        chmod 755 "$EO_RUNDIR"
        run_as=(runuser -u postgres --)
    fi
    log "starting PostgreSQL in $EO_RUNDIR/pg"
    "${run_as[@]}" "$bindir/initdb" -D "$EO_RUNDIR/pg/data" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
    "${run_as[@]}" "$bindir/pg_ctl" -D "$EO_RUNDIR/pg/data" -l "$EO_RUNDIR/pg/server.log" -w -t 60 \
        -o "-k $EO_RUNDIR/pg -c listen_addresses='' -c fsync=on -c max_connections=300 -c track_commit_timestamp=on -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64" start >/dev/null
    EO_PG_STARTED=1
    "$bindir/createdb" -h "$EO_RUNDIR/pg" -U postgres eventoutbox
    export EVENTOUTBOX_DATABASE_URL="postgresql:///eventoutbox?host=$EO_RUNDIR/pg&user=postgres"
    export EO_PG_BINDIR="$bindir" EO_PG_DATA="$EO_RUNDIR/pg/data"
}

stop_postgres() {
    [ "${EO_PG_STARTED:-}" = 1 ] || return 0
    local run_as=()
    [ "$(id -u)" -eq 0 ] && run_as=(runuser -u postgres --)
    "${run_as[@]}" "$(pg_bindir)/pg_ctl" -D "$EO_RUNDIR/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    EO_PG_STARTED=0
}

# Starts kafka-mock-cluster (built beforehand) and exports KAFKA_BROKERS.
start_kafka() {
    local binary=$1 deadline
    log "starting kafka-mock-cluster"
    "$binary" --brokers 3 --bootstrap-file "$EO_RUNDIR/kafka.bootstrap" "${@:2}" \
        >"$EO_RUNDIR/kafka.log" 2>&1 &
    EO_KAFKA_PID=$!
    deadline=$((SECONDS + 30))
    until [ -s "$EO_RUNDIR/kafka.bootstrap" ]; do
        if ! kill -0 "$EO_KAFKA_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            log "kafka-mock-cluster did not start:"; cat "$EO_RUNDIR/kafka.log" >&2; return 1
        fi
        sleep 0.1
    done
    export KAFKA_BROKERS
    KAFKA_BROKERS=$(cat "$EO_RUNDIR/kafka.bootstrap")
}

stop_kafka() {
    [ -n "${EO_KAFKA_PID:-}" ] || return 0
    kill "$EO_KAFKA_PID" 2>/dev/null || true
    wait "$EO_KAFKA_PID" 2>/dev/null || true
    EO_KAFKA_PID=
}

# Creates $EO_RUNDIR and arranges for everything to be stopped and removed on any exit.
make_rundir() {
    EO_RUNDIR=$(mktemp -d "${TMPDIR:-/tmp}/eventoutbox.XXXXXX")
    export EO_RUNDIR
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

cleanup() {
    local status=$?
    stop_kafka
    stop_postgres
    [ -n "${EO_KEEP_RUNDIR:-}" ] || rm -rf "$EO_RUNDIR"
    exit $status
}
