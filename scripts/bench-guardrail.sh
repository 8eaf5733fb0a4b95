#!/usr/bin/env bash
# The guardrail proxy's pass-through cost, against the same requests direct and
# through nginx as a reverse proxy, at a fixed concurrency, on this machine.
#
#   sudo bash scripts/bench-guardrail.sh            # installs nginx and wrk (Debian)
#
# The guardrail is an nginx answering an OpenAI moderation verdict from memory on
# 127.0.0.1:18080. A second nginx proxies it on :18081 (HTTP/1.1 keep-alive upstream,
# as one would run it); the gpuchaos agent's standing guardrail proxy on :18082 (no
# fault attached: answers pass untouched). wrk drives each for the same time with the same
# connections; every figure comes from one run, so the ratios compare like with like.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-32}
SECS=${SECS:-10}

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release -q -p gpuchaos-agent -p gpuchaos-controller

work=$(mktemp -d)
cleanup() {
    for p in "$work"/*.pid; do [[ -f $p ]] && kill "$(cat "$p")" 2>/dev/null; done || true
    [[ -n ${agent:-} ]] && kill "$agent" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

body='{"id":"modr-1","model":"omni-moderation-latest","results":[{"flagged":true,"categories":{"hate":false,"violence":true},"category_scores":{"hate":0.01,"violence":0.97}}]}'
# Two nginx instances: the guardrail (one worker), and the reverse proxy (a worker per
# core). Both proxies then forward to a separate process, as in production; had the
# reverse proxy shared the guardrail's workers, it would skip the hop between
# processes that the gpuchaos proxy cannot.
nginx_conf() { # name workers server-block
    cat >"$work/$1.conf" <<EOF
worker_processes $2;
pid $work/$1.pid;
error_log $work/$1.error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/$1-body;
    proxy_temp_path $work/$1-proxy;
    fastcgi_temp_path $work/$1-fastcgi;
    uwsgi_temp_path $work/$1-uwsgi;
    scgi_temp_path $work/$1-scgi;
    $3
}
EOF
}
nginx_conf guardrail 1 "server { listen 127.0.0.1:18080; location / { default_type application/json; return 200 '$body'; } }"
nginx_conf proxy auto "upstream guardrail { server 127.0.0.1:18080; keepalive 64; }
    server { listen 127.0.0.1:18081; location / { proxy_pass http://guardrail; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx -c "$work/guardrail.conf"
nginx -c "$work/proxy.conf"
./target/release/gpuchaos-agent --state-dir "$work/state" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --guardrail-proxy 127.0.0.1:18082=http://127.0.0.1:18080 >"$work/agent.out" 2>"$work/agent.log" &
agent=$!
for _ in $(seq 50); do grep -q listening "$work/agent.out" && break; sleep 0.1; done

run() { # name port -> "name rps p50_ms p99_ms"
    local out
    out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.1:$2/v1/moderations")
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    echo "$1 $rps $(ms "$p50") $(ms "$p99")"
}
ms() { # wrk's 1.23ms / 456.78us / 1.20s -> milliseconds
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

for port in 18080 18081 18082; do wrk -t1 -c4 -d1s "http://127.0.0.1:$port/" >/dev/null; done
direct=$(run direct 18080)
nginx=$(run nginx 18081)
gpuchaos=$(run gpuchaos 18082)
# The same proxy with a fault attached that never fires: every answer now goes
# through the HTTP path (parsed, drawn for, forwarded), not the splice.
grpc=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/agent.out")
printf 'kind: guardrail\nduration: 10m\nlisten: 127.0.0.1:18082\npreset: openai-moderation\ncorrupt: {flip_verdict: 0.0}\n' >"$work/idle.yaml"
./target/release/gpuchaos --agent "$grpc" inject -f "$work/idle.yaml" >/dev/null
attached=$(run "gpuchaos, fault attached" 18082)
./target/release/gpuchaos --agent "$grpc" halt >/dev/null

echo
echo "wrk -t2 -c$CONNS -d${SECS}s, $(nproc) cores, one run"
echo
printf '| %-28s | %10s | %8s | %8s |\n' "" "req/s" "p50 ms" "p99 ms"
printf '|------------------------------|------------|----------|----------|\n'
for row in "$direct" "$nginx" "$gpuchaos" "$attached"; do
    read -r rps p50 p99 <<<"$(awk '{print $(NF-2), $(NF-1), $NF}' <<<"$row")"
    name=$(awk '{NF-=3; print}' <<<"$row")
    printf '| %-28s | %10s | %8s | %8s |\n' "$name" "$rps" "$p50" "$p99"
done
read -r _ n_rps _ n_p99 <<<"$nginx"
read -r _ g_rps g_p50 g_p99 <<<"$gpuchaos"
read -r _ _ n_p50 _ <<<"$nginx"
echo
awk -v gr="$g_rps" -v nr="$n_rps" -v g99="$g_p99" -v n99="$n_p99" -v g50="$g_p50" -v n50="$n_p50" 'BEGIN {
    printf "gpuchaos / nginx: throughput %.2fx (target >= 0.80), p50 %.2fx, p99 %.2fx (target <= 1.30)\n", gr / nr, g50 / n50, g99 / n99
}'
