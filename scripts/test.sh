#!/usr/bin/env bash
# The test command: sets up everything a fresh machine needs, then runs every check
# and every test. CI runs exactly this (through .ci/run).
#
#   bash scripts/test.sh
#
# Needs root: for the system packages, and for the network tests, which build their
# own hosts in network namespaces (ip netns, veth) and run nftables and tc inside
# them only. The other tests signal only processes they start, on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v pgrep >/dev/null || need_pkgs+=(procps)
command -v sleep >/dev/null || need_pkgs+=(coreutils)
# The network fault kind and its tests: nft, tc and ip, nsenter and unshare.
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v tc >/dev/null || need_pkgs+=(iproute2)
command -v nsenter >/dev/null || need_pkgs+=(util-linux)
# HTTP/2 and metrics checks in the guardrail tests.
command -v curl >/dev/null || need_pkgs+=(curl)
# The serve page is checked in a real headless browser; the locked-history test
# holds SQLite's lock from Python's sqlite3.
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v python3 >/dev/null || need_pkgs+=(python3)
# check-jsonschema's virtualenv (below) needs venv and ensurepip.
python3 -c 'import ensurepip, venv' 2>/dev/null || need_pkgs+=(python3-venv)
# Stop conditions and probes are tested against a real Prometheus server.
command -v prometheus >/dev/null || need_pkgs+=(prometheus)
for t in lintian:lintian systemd-analyze:systemd dpkg-shlibdeps:dpkg-dev strip:binutils man:man-db; do command -v "${t%%:*}" >/dev/null || need_pkgs+=("${t#*:}"); done # the .deb, man-page and completion tests (tests/tests/package.rs, completions.rs)
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing ${need_pkgs[*]}: install them (as root: apt-get install ${need_pkgs[*]})" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi
# The CI templates (examples/ci) are checked against GitHub's and GitLab's published
# schemas by check-jsonschema (its vendored copies: no network at test time), from a
# virtualenv of its own, made once and reused while the version matches.
CHECK_JSONSCHEMA_VERSION=0.39.0
venv="${XDG_CACHE_HOME:-$HOME/.cache}/gpuchaos-test/venv"
if [[ "$("$venv/bin/check-jsonschema" --version 2>/dev/null)" != *" $CHECK_JSONSCHEMA_VERSION" ]]; then
    echo "== installing check-jsonschema $CHECK_JSONSCHEMA_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
fi
export GPUCHAOS_CHECK_JSONSCHEMA="$venv/bin/check-jsonschema"
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "== installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

echo "== cargo fmt --check"
cargo fmt --all --check
# The test hooks (GPUCHAOS_FAILPOINT in the agent, GPUCHAOS_CLOCK in serve) are
# compiled in only here: every build below uses the same features, so the binaries
# the end-to-end tests run are the ones nextest built.
HOOKS=(--features gpuchaos-agent/test-hooks,gpuchaos-controller/test-hooks)
echo "== cargo clippy --all-targets -- -D warnings (with and without the test hooks)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked "${HOOKS[@]}" -- -D warnings
echo "== cargo build --workspace, with the test hooks (the end-to-end tests run these binaries)"
cargo build --workspace --locked "${HOOKS[@]}"
echo "== gpuchaos validate experiments/"
./target/debug/gpuchaos validate experiments/*.yaml experiments/specs/*.yaml experiments/refstack/*.yaml experiments/gamedays/*.yaml examples/ci/*.yaml
echo "== cargo build --release of the two binaries (the package test packs them; built here, not alongside the timing-sensitive tests)"
cargo build --release --locked -p gpuchaos-agent -p gpuchaos-controller
echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast "${HOOKS[@]}"
echo "== doc tests (nextest does not run them; e.g. a CUDA context cannot be destroyed twice)"
cargo test --doc --workspace --locked "${HOOKS[@]}"
