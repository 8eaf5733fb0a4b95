#!/usr/bin/env bash
# Hostile input, measured: what the CLI and the agent spend on inputs that used to
# take them down (docs/benchmarks.md, "Limits"). Prints one line per case.
#
#   bash scripts/bench-limits.sh            # release build of the CLI (built if missing)
#
# The agent-side figures come from the tests that check them (debug build), run with
# their output shown.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p gpuchaos-controller >/dev/null 2>&1
cli=./target/release/gpuchaos
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 - "$tmp" <<'PY'
import sys
d = sys.argv[1]
def keys(n, path):
    with open(path, "w") as f:
        f.write("metadata:\n  name: x\n  labels:\n")
        for i in range(n):
            f.write(f"    k{i}: v{i}\n")
keys(20_000, f"{d}/k20.yaml")
keys(80_000, f"{d}/k80.yaml")
with open(f"{d}/ten-mb.yaml", "w") as f:
    f.write("metadata:\n  name: x\n  labels:\n")
    i = 0
    while f.tell() < 10_000_000:
        f.write(f"    key_number_{i}: value_{i}\n")
        i += 1
with open(f"{d}/regex.yaml", "w") as f:
    f.write("kind: process\nduration: 1m\naction: pause\ntarget: {cmdline: '" + "a(b|c)*" * 520_000 + "'}\n")
PY

measure() {
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$tmp/time" "$@" >/dev/null 2>"$tmp/err" || true
    read -r secs kib < <(tail -1 "$tmp/time")
    printf '%-44s %7.2f s  %7d MiB peak RSS  %s\n' "$label" "$secs" "$((kib / 1024))" \
        "$(head -c 110 "$tmp/err" | tr '\n' ' ')"
}

echo "== the CLI (release)"
measure "validate /dev/zero" "$cli" validate /dev/zero
measure "validate a 17 MiB file (over the cap)" bash -c "truncate -s 17M $tmp/big.yaml && $cli validate $tmp/big.yaml"
measure "validate 20k keys in one mapping" "$cli" validate "$tmp/k20.yaml"
measure "validate 80k keys in one mapping" "$cli" validate "$tmp/k80.yaml"
measure "validate a 10 MB file (420k keys)" "$cli" validate "$tmp/ten-mb.yaml"
measure "validate a 3.6 MB regex" "$cli" validate "$tmp/regex.yaml"

echo "== the agent (tests with their figures)"
cargo nextest run --locked -p gpuchaos-tests --no-capture \
    -E 'test(huge_regexes_are_refused) | test(a_duration_holds_while_heavy_specs) | test(proxied_connections_keep_flowing)' 2>&1 |
    grep -E "peak RSS|a 1s pause lasted|in flight across|next request on" || true
