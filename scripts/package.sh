#!/usr/bin/env bash
# Builds the Debian package: target/debian/gpuchaos_VERSION_ARCH.deb, holding the
# stripped release binaries (gpuchaos, gpuchaos-agent), the gpuchaos-agent systemd
# unit, the default policy, shell completions and man pages. Plain dpkg-deb on a
# tree staged here (no cargo-deb); the sources of everything but the binaries are in
# packaging/.
#
#   bash scripts/package.sh                 # cargo build --release, then package
#   bash scripts/package.sh --skip-build    # package target/release as it is
#   GPUCHAOS_PACKAGE_SKIP_BUILD=1 bash scripts/package.sh   # the same
#
# The release build covers the two binaries only (-p gpuchaos-agent -p
# gpuchaos-controller), never with the test hooks; cargo reuses target/release, so
# a second run costs seconds. CARGO_TARGET_DIR is honoured. Prints the path of the
# package on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_build=${GPUCHAOS_PACKAGE_SKIP_BUILD:-}
for arg in "$@"; do
    case "$arg" in
    --skip-build) skip_build=1 ;;
    -h | --help)
        sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "package.sh: unknown argument $arg (see --help)" >&2
        exit 64
        ;;
    esac
done

missing=()
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v strip >/dev/null || missing+=(binutils)
command -v gzip >/dev/null || missing+=(gzip)
if ((${#missing[@]})); then
    echo "package.sh: missing tools: install them (apt-get install ${missing[*]})" >&2
    exit 69
fi

# The version is the workspace's; the Debian changelog must have an entry for it.
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
[[ -n $version ]] || {
    echo "package.sh: no version in [workspace.package] of Cargo.toml" >&2
    exit 70
}
if [[ $(head -n1 packaging/changelog) != "gpuchaos ($version) "* ]]; then
    echo "package.sh: packaging/changelog does not start with an entry for $version: add one (Debian changelog format)" >&2
    exit 64
fi
arch=$(dpkg --print-architecture)
target=${CARGO_TARGET_DIR:-target}
bindir=$target/release

if [[ -z $skip_build ]]; then
    echo "== cargo build --release -p gpuchaos-agent -p gpuchaos-controller" >&2
    cargo build --release --locked -p gpuchaos-agent -p gpuchaos-controller >&2
fi
for b in gpuchaos gpuchaos-agent; do
    [[ -x $bindir/$b ]] || {
        echo "package.sh: $bindir/$b is missing: run without --skip-build" >&2
        exit 64
    }
done

out=$target/debian
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
umask 022
dirs=(
    usr/bin
    lib/systemd/system
    etc/gpuchaos
    etc/default
    usr/share/man/man1
    usr/share/doc/gpuchaos
    usr/share/lintian/overrides
    usr/share/bash-completion/completions
    usr/share/zsh/vendor-completions
    usr/share/fish/vendor_completions.d
)
for d in "${dirs[@]}"; do
    mkdir -p "$stage/$d"
done

# The binaries, stripped the way dh_strip does (debug info and notes out).
for b in gpuchaos gpuchaos-agent; do
    install -m 0755 "$bindir/$b" "$stage/usr/bin/$b"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/$b"
done

install -m 0644 packaging/gpuchaos-agent.service "$stage/lib/systemd/system/"
install -m 0644 packaging/policy.yaml "$stage/etc/gpuchaos/policy.yaml"
install -m 0644 packaging/gpuchaos-agent.default "$stage/etc/default/gpuchaos-agent"
install -m 0644 packaging/copyright "$stage/usr/share/doc/gpuchaos/copyright"
# Lintian overrides, each with the reason beside it (packaging/lintian-overrides).
if [[ -f packaging/lintian-overrides ]]; then
    install -m 0644 packaging/lintian-overrides "$stage/usr/share/lintian/overrides/gpuchaos"
else
    rmdir "$stage/usr/share/lintian/overrides" "$stage/usr/share/lintian"
fi
# A native package: its changelog is changelog.gz. -n: no name or time stamp in the
# gzip header, so the same tree gives the same bytes.
gzip -9n <packaging/changelog >"$stage/usr/share/doc/gpuchaos/changelog.gz"

# Completions and man pages, generated from the CLI's own clap definitions.
"$stage/usr/bin/gpuchaos" completions bash >"$stage/usr/share/bash-completion/completions/gpuchaos"
"$stage/usr/bin/gpuchaos" completions zsh >"$stage/usr/share/zsh/vendor-completions/_gpuchaos"
"$stage/usr/bin/gpuchaos" completions fish >"$stage/usr/share/fish/vendor_completions.d/gpuchaos.fish"
"$stage/usr/bin/gpuchaos" man --out "$stage/usr/share/man/man1" >/dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1
chmod 0644 "$stage"/usr/share/bash-completion/completions/* "$stage"/usr/share/zsh/vendor-completions/* \
    "$stage"/usr/share/fish/vendor_completions.d/* "$stage"/usr/share/man/man1/*

# Maintainer scripts and the conffiles (dpkg-deb does not guess them).
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$stage/DEBIAN/"
(cd "$stage" && find etc -type f | sort | sed 's|^|/|') >"$stage/DEBIAN/conffiles"
chmod 0644 "$stage/DEBIAN/conffiles"

# Depends from the binaries' own ELF dependencies (libc6, libgcc-s1), as
# dpkg-shlibdeps finds them; it wants a debian/control to exist, so it runs in a
# scratch directory of its own.
shlib=$out/shlibdeps
rm -rf "$shlib"
mkdir -p "$shlib/debian"
: >"$shlib/debian/control"
abs_stage=$(cd "$stage" && pwd)
depends=$(cd "$shlib" && dpkg-shlibdeps -O -e"$abs_stage/usr/bin/gpuchaos" -e"$abs_stage/usr/bin/gpuchaos-agent" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
[[ -n $depends ]] || {
    echo "package.sh: dpkg-shlibdeps found no dependencies for the binaries" >&2
    exit 70
}
rm -rf "$shlib"

# Recommends: the tools of the network kind (nft; tc and ip; nsenter). util-linux is
# Essential, so it is there anyway; the version says the agent needs nsenter --net
# (2.23), and Debian policy wants a version on any relation to an Essential package.
installed_kb=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
maintainer=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' packaging/changelog | head -n1)
cat >"$stage/DEBIAN/control" <<EOF
Package: gpuchaos
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_kb
Depends: $depends
Recommends: nftables, iproute2, util-linux (>= 2.23)
Section: admin
Priority: optional
Description: chaos engineering for GPU inference nodes
 gpuchaos injects faults into GPU inference nodes and measures how the serving
 stack recovers: process kills, pauses and crash loops, GPU memory pressure,
 guardrail (safety filter) corruption, and network latency, loss and partitions.
 .
 This package holds the gpuchaos CLI (experiments, game days, reports) and
 gpuchaos-agent, the node agent that injects the faults and reverts every one of
 them. Its systemd unit is installed but neither enabled nor started: enable it
 on the nodes where faults are meant to be injected.
EOF

# md5sums of everything but the conffiles, as dh_md5sums writes them.
(cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -print | sed 's|^\./||' | sort |
    xargs md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums"

deb=$out/gpuchaos_${version}_${arch}.deb
# Files owned by root whoever builds; xz like Debian's own packages.
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >&2
echo "$deb"
