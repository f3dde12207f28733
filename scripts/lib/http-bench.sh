# Sourced by scripts/bench: accounts-service under wrk (deposits on 100 accounts, 16 connections, 15 s), without
# and with its aggregate cache, and with bearer tokens, then eventoutbox-bench append with as many connections, in
# the same run. Prints each run's conflicts retried and cache hits from the service's /metrics. Needs $bin, the
# servers and wrk.
http_bench() {
    local schema url port metrics pid accounts id cache login auth secret token=""
    schema=http_$RANDOM
    "$EO_PG_BINDIR/psql" -q "$EVENTOUTBOX_DATABASE_URL" -c "CREATE SCHEMA $schema"
    url="$EVENTOUTBOX_DATABASE_URL&options=-csearch_path%3D$schema"
    EVENTOUTBOX_DATABASE_URL="$url" "$bin/eventoutbox" migrate >/dev/null
    secret="$EO_RUNDIR/jwt.secret"
    head -c 48 /dev/urandom | base64 >"$secret"
    for mode in "0 none" "10000 none" "10000 jwt"; do
        read -r cache login <<<"$mode"
        port=$((20000 + RANDOM % 10000))
        metrics=$((port + 1))
        if [ "$login" = jwt ]; then
            auth=(--jwt-secret-file "$secret")
            token="Bearer $("$bin/accounts-service" --jwt-secret-file "$secret" --mint-token bench)"
        else
            auth=(--insecure-no-auth)
            token=""
        fi
        EVENTOUTBOX_DATABASE_URL="$url" "$bin/accounts-service" "${auth[@]}" --port $port --metrics-port $metrics \
            --max-connections 16 --aggregate-cache-size $cache --log-level error &
        pid=$!
        until curl -sf "localhost:$port/health/ready" >/dev/null; do sleep 0.2; done
        accounts="$EO_RUNDIR/accounts.txt"
        : >"$accounts"
        for n in $(seq 1 100); do
            id=$(curl -sf -X POST "localhost:$port/accounts" -H 'Content-Type: application/json' ${token:+-H "Authorization: $token"} \
                -d "{\"owner\": \"L$n\"}" | sed -E 's/.*"id":"([^"]+)".*/\1/')
            echo "$id" >>"$accounts"
        done
        echo -n "${auth[*]} --aggregate-cache-size $cache: "
        ACCOUNTS_FILE="$accounts" TOKEN="$token" wrk -t2 -c16 -d15s --latency -s scripts/lib/deposit.lua "http://127.0.0.1:$port" | tail -1
        echo "  $(curl -sf "localhost:$metrics/metrics" | grep -E '^eventoutbox_(command_conflicts|aggregate_cache_[a-z]+)_total' | tr '\n' ' ')"
        echo "  accounts-service peak RSS: $(sed -nE 's/^VmHWM:\s+([0-9]+) kB/\1/p' /proc/$pid/status) kB"
        kill $pid
        wait $pid 2>/dev/null || true
    done
    "$bin/eventoutbox-bench" append --connections 16 --events 5000 --baseline
}
