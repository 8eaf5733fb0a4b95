#!/usr/bin/env bash
# gpuchaos on a real NVIDIA GPU: every GPU verification in one command, in under five
# minutes, printed as one table (docs/gpu.md, "The real-GPU check").
#
#   scripts/gpu-check.sh [--bin DIR] [--gpu N] [--fake] [--keep]
#
#   --bin DIR  where gpuchaos-agent, gpuchaos, gpuchaos-refstack and
#              libgpuchaos_cuda_interpose.so are (default: target/release, else
#              target/debug). Build them on a machine with the toolchain and carry
#              them over: nothing is downloaded or built here.
#   --gpu N    the GPU to check (default 0). Nothing else on it should be running.
#   --fake     run against the project's fake driver instead (no GPU needed; the
#              test suite runs it so that this script never goes stale); the
#              nvidia-smi columns then read "fake".
#   --keep     keep the work directory (logs, specs, the agent's journal).
#
# Needs: bash, python3 (to read JSON), and on a real GPU nvidia-smi and the driver's
# libcuda.so.1 / libnvidia-ml.so.1. Run as root for the agent's full capabilities
# (GPU memory and compute work as any user who may use the GPU).
#
# Checks:
#   1-2  gpu_memory to 50% and 95% of the GPU: the agent's figure beside
#        nvidia-smi's, and how long the fill took to be verified;
#   3    a second process asking for what is free and 1 GiB more while 95% is held
#        gets CUDA_ERROR_OUT_OF_MEMORY;
#   4    SIGKILL of the agent while 95% is held: the memory is back (nvidia-smi)
#        within 10s, and the restarted agent leaves no helper behind;
#   5-6  gpu_compute at 50% and 90%: the achieved share (the helper's kernel
#        timings) beside nvidia-smi's utilization; revert time;
#   7    gpu_xid 79 through the CUDA interposer: a workload started with it fails
#        with the Xid's CUDA error, and the kernel-log line is written (to a file
#        here, never the machine's /dev/kmsg).
# Exit 0 when every check passed, 1 when one failed, 2 on bad usage or a missing
# binary.
set -uo pipefail

BIN=""
GPU=0
FAKE=0
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="${2:-}"; shift 2 ;;
        --gpu) GPU="${2:-}"; shift 2 ;;
        --fake) FAKE=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$BIN" ]; then
    if [ -x "$ROOT/target/release/gpuchaos-agent" ] && [ -x "$ROOT/target/release/gpuchaos-refstack" ]; then
        BIN="$ROOT/target/release"
    else
        BIN="$ROOT/target/debug"
    fi
fi
[ -d "$BIN" ] || { echo "gpu-check: $BIN is not a directory" >&2; exit 2; }
BIN="$(cd "$BIN" && pwd)" # the interposer needs the real driver's absolute path
for f in gpuchaos-agent gpuchaos gpuchaos-refstack libgpuchaos_cuda_interpose.so; do
    if [ ! -e "$BIN/$f" ]; then
        echo "gpu-check: $BIN/$f is missing: build with 'cargo build --release --workspace' and pass --bin DIR" >&2
        exit 2
    fi
done
command -v python3 >/dev/null || { echo "gpu-check: python3 is needed to read the agent's JSON" >&2; exit 2; }
if [ "$FAKE" = 0 ]; then
    command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: is the NVIDIA driver installed? (or use --fake)" >&2; exit 2; }
fi

# CUDA numbers devices fastest first unless told otherwise, NVML (the agent and
# nvidia-smi) by PCI bus: make the CUDA workloads here number them as NVML does, and
# see every device.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
unset CUDA_VISIBLE_DEVICES

WORK="$(mktemp -d /tmp/gpuchaos-gpu-check.XXXXXX)"
AGENT_PID=""
PROBE_PID=""
cleanup() {
    [ -n "$PROBE_PID" ] && kill "$PROBE_PID" 2>/dev/null
    if [ -n "$AGENT_PID" ] && [ -n "$ADDR" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        "$BIN/gpuchaos" --agent "$ADDR" halt >/dev/null 2>&1
        kill -TERM "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    if [ "$KEEP" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ADDR="" # the agent's, read from its first line (it listens on a free port)
AGENT_ARGS=(--listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --state-dir "$WORK/state"
    --xid-dir "$WORK/xid" --xid-kmsg "$WORK/kmsg.log")
if [ "$FAKE" = 1 ]; then
    FAKELIB="$BIN/libgpuchaos_fakegpu.so"
    [ -e "$FAKELIB" ] || { echo "gpu-check: $FAKELIB is missing (--fake needs the fake driver)" >&2; exit 2; }
    export GPUCHAOS_FAKE_GPU_STATE="$WORK/fake-gpu.json" GPUCHAOS_FAKE_GPUS="1x80GiB"
    AGENT_ARGS+=(--nvml-lib "$FAKELIB" --cuda-lib "$FAKELIB")
    REAL_CUDA="$FAKELIB"
else
    # The 64-bit driver (ldconfig may list an i386 one first).
    REAL_CUDA="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')"
    [ -n "$REAL_CUDA" ] || REAL_CUDA=/usr/lib/x86_64-linux-gnu/libcuda.so.1
fi

now_ms() { date +%s%3N; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }
ROWS=()
FAILED=0
pc() { [ "$1" = fake ] && echo fake || echo "$1%"; }
row() { # check, target, agent, nvidia-smi, time, verdict
    ROWS+=("$1|$2|$3|$4|$5|$6")
    [ "$6" = PASS ] || FAILED=1
    printf '  %-34s %s\n' "$1" "$6 ($3; nvidia-smi $4; $5)" >&2
}

start_agent() {
    "$BIN/gpuchaos-agent" "${AGENT_ARGS[@]}" >"$WORK/agent.out" 2>>"$WORK/agent.log" &
    AGENT_PID=$!
    for _ in $(seq 1 100); do
        ADDR="$(grep -o 'grpc=[^ ]*' "$WORK/agent.out" 2>/dev/null | head -1 | cut -d= -f2)"
        [ -n "$ADDR" ] && return 0
        sleep 0.1
    done
    echo "gpu-check: the agent did not start:" >&2
    tail -20 "$WORK/agent.log" >&2
    exit 1
}

# used% and total bytes of the GPU, from the agent (NVML).
agent_gpu() { "$BIN/gpuchaos" --agent "$ADDR" --output json status | json "
g=[g for g in d['gpus'] if g['index']==$GPU][0]; print('%.1f %d' % (100*g['memory_used_bytes']/g['memory_total_bytes'], g['memory_total_bytes']))"; }
smi() { # memory used% and utilization% from nvidia-smi
    if [ "$FAKE" = 1 ]; then echo "fake fake"; return; fi
    # A figure nvidia-smi cannot give reads [N/A]: reported as n/a, never summed.
    nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits -i "$GPU" |
        awk -F', *' '{u = ($3 ~ /^[0-9]+$/) ? $3 : "n/a"; if ($1 ~ /^[0-9]+$/ && $2 > 0) printf "%.1f %s\n", 100*$1/$2, u; else printf "n/a %s\n", u}'
}
inject() { # spec file → fault id (empty when refused), inject_ms on fd 3
    local out
    out="$("$BIN/gpuchaos" --agent "$ADDR" --output json inject -f "$1")"
    echo "$out" >"$WORK/last-inject.json"
    echo "$out" | json "f=d['faults'][0]; print(f['id'] or '', '%.0f' % f.get('inject_ms', 0)) if f.get('state') == 'active' else print('')"
}
details() { "$BIN/gpuchaos" --agent "$ADDR" --output json status | json "
f=[f for f in d['faults'] if f['id']=='$1'][0]; print(json.dumps(f['details']))"; }
revert() { "$BIN/gpuchaos" --agent "$ADDR" revert "$1" >/dev/null; }
# A process that runs (a zombie waiting for a reaper holds no GPU memory: it does not).
running() { [ -r "/proc/$1/stat" ] && ! awk '{exit ($3 == "Z") ? 0 : 1}' "/proc/$1/stat" 2>/dev/null; }
within() { python3 -c "import sys; a,b,t=map(float,sys.argv[1:]); sys.exit(0 if abs(a-b)<=t else 1)" "$@"; }

T0=$(now_ms)
echo "gpuchaos GPU check on GPU $GPU$([ "$FAKE" = 1 ] && echo ' (fake driver)'); binaries in $BIN; work in $WORK" >&2
start_agent
read -r BASE_PCT TOTAL < <(agent_gpu)
echo "  GPU $GPU: $((TOTAL >> 20)) MiB, ${BASE_PCT}% used before the checks" >&2

# 1-2: gpu_memory at 50% and 95%.
for pct in 50 95; do
    cat >"$WORK/mem$pct.yaml" <<EOF
kind: gpu_memory
duration: 2m
target: {gpus: [$GPU]}
fill: {percent: $pct}
EOF
    t=$(now_ms)
    read -r ID MS < <(inject "$WORK/mem$pct.yaml")
    took=$(( $(now_ms) - t ))
    if [ -z "$ID" ]; then
        row "gpu_memory $pct%" "$pct%" "refused" "-" "-" FAIL
        cat "$WORK/last-inject.json" >&2
        continue
    fi
    read -r APCT _ < <(agent_gpu)
    read -r SPCT _ < <(smi)
    verdict=FAIL
    if within "$APCT" "$pct" 2 && { [ "$SPCT" = fake ] || { [ "$SPCT" != n/a ] && within "$SPCT" "$APCT" 2; }; }; then verdict=PASS; fi
    row "gpu_memory $pct%" "$pct%" "${APCT}%" "$(pc "$SPCT")" "verified in ${MS} ms (${took} ms round trip)" $verdict
    if [ "$pct" = 95 ]; then
        # 3: a second process gets CUDA_ERROR_OUT_OF_MEMORY: it asks for what is
        # free (the fill lands within a few points of 95%) and 1 GiB more.
        ask=$(python3 -c "import sys; t=float(sys.argv[1]); u=float(sys.argv[2]); print(int(t*(100-u)/100) + (1<<30))" "$TOTAL" "$APCT")
        probe="$(GPUCHAOS_CUDA_LIB="$REAL_CUDA" "$BIN/gpuchaos-refstack" cuda-probe --gpu "$GPU" --alloc "$ask" 2>&1 | tail -1)"
        v=FAIL; [[ "$probe" == *CUDA_ERROR_OUT_OF_MEMORY* ]] && v=PASS
        row "second process asks free + 1 GiB" "OOM" "$probe" "-" "-" $v
        # 4: SIGKILL of the agent frees everything: its helpers die with it (they
        # hold the memory), nvidia-smi shows the memory back.
        HELPERS="$(details "$ID" | json "print(' '.join(str(g['helper_pid']) for g in d['gpus']))")"
        kill -KILL "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null; AGENT_PID=""
        t=$(now_ms); back=""
        for _ in $(seq 1 100); do
            alive=0
            for h in $HELPERS; do running "$h" && alive=1; done
            if [ "$alive" = 0 ]; then
                read -r SPCT _ < <(smi)
                if [ "$SPCT" = fake ] || { [ "$SPCT" != n/a ] && within "$SPCT" "$BASE_PCT" 3; }; then back=yes; break; fi
            fi
            sleep 0.1
        done
        freed=$(( $(now_ms) - t ))
        start_agent
        left=0
        for h in $HELPERS; do running "$h" && left=$((left + 1)); done
        read -r APCT _ < <(agent_gpu)
        read -r SPCT _ < <(smi)
        v=FAIL; [ -n "$back" ] && [ "$left" = 0 ] && within "$APCT" "$BASE_PCT" 3 && v=PASS
        row "agent SIGKILL while 95% held" "freed" "${APCT}% after restart, $left helpers left" "$(pc "$SPCT")" "freed in ${freed} ms" $v
    else
        revert "$ID"
    fi
done

# 5-6: gpu_compute at 50% and 90%.
for pct in 50 90; do
    cat >"$WORK/compute$pct.yaml" <<EOF
kind: gpu_compute
duration: 2m
target: {gpus: [$GPU]}
load: {percent: $pct}
EOF
    read -r ID MS < <(inject "$WORK/compute$pct.yaml")
    if [ -z "$ID" ]; then
        row "gpu_compute $pct%" "$pct%" "refused" "-" "-" FAIL
        cat "$WORK/last-inject.json" >&2
        continue
    fi
    sum=0; n=0
    for _ in $(seq 1 10); do
        read -r _ U < <(smi)
        case "$U" in fake|n/a) ;; *) sum=$((sum + U)); n=$((n + 1)) ;; esac
        sleep 0.3
    done
    ACH="$(details "$ID" | json "print('%.1f' % d['gpus'][0]['achieved_percent'])")"
    NV="$(details "$ID" | json "print(d['gpus'][0].get('nvml_utilization_percent', '-'))")"
    SMI=fake; [ "$n" -gt 0 ] && SMI=$((sum / n))
    t=$(now_ms); revert "$ID"; rt=$(( $(now_ms) - t ))
    v=FAIL
    if within "$ACH" "$pct" "$(python3 -c "print($pct*0.05)")" && { [ "$SMI" = fake ] || within "$SMI" "$pct" 10; }; then v=PASS; fi
    row "gpu_compute $pct%" "$pct%" "${ACH}% (NVML ${NV}%)" "$(pc "$SMI")" "verified in ${MS} ms, reverted in ${rt} ms" $v
done

# 7: gpu_xid 79 through the CUDA interposer.
GPUCHAOS_CUDA_LIB="$BIN/libgpuchaos_cuda_interpose.so" GPUCHAOS_REAL_CUDA="$REAL_CUDA" \
    GPUCHAOS_XID_DIR="$WORK/xid" "$BIN/gpuchaos-refstack" cuda-probe --gpu "$GPU" --run 60s \
    >"$WORK/probe.out" 2>&1 &
PROBE_PID=$!
for _ in $(seq 1 100); do grep -q "^ok " "$WORK/probe.out" && break; sleep 0.1; done
cat >"$WORK/xid.yaml" <<EOF
kind: gpu_xid
duration: 1m
target: {gpus: [$GPU]}
xid: 79
layers: {cuda: required}
EOF
t=$(now_ms)
read -r ID MS < <(inject "$WORK/xid.yaml")
err=""
for _ in $(seq 1 100); do
    err="$(grep -m1 "err " "$WORK/probe.out")" && break
    sleep 0.05
done
seen=$(( $(now_ms) - t ))
kmsg="$(grep -m1 "NVRM: Xid" "$WORK/kmsg.log" 2>/dev/null)"
[ -n "$ID" ] && revert "$ID"
kill "$PROBE_PID" 2>/dev/null; wait "$PROBE_PID" 2>/dev/null; PROBE_PID=""
v=FAIL; [ -n "$ID" ] && [ -n "$err" ] && [ -n "$kmsg" ] && v=PASS
[ -n "$ID" ] || cat "$WORK/last-inject.json" >&2
row "gpu_xid 79 (CUDA layer)" "CUDA error" "${err:-no error seen} / kmsg: ${kmsg:-none}" "-" "workload failed ${seen} ms after inject" $v

TOTAL_S=$(( ($(now_ms) - T0) / 1000 ))
echo
echo "| check | target | agent / workload | nvidia-smi | time | verdict |"
echo "|---|---|---|---|---|---|"
for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c d e f <<<"$r"
    echo "| $a | $b | $c | $d | $e | $f |"
done
echo
echo "GPU $GPU ($([ "$FAKE" = 1 ] && echo fake driver || nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i "$GPU")): $([ $FAILED = 0 ] && echo 'every check passed' || echo 'a check FAILED') in ${TOTAL_S}s"
exit $FAILED
