#!/usr/bin/env bash
# Installs blockd into the standard places (like `make install`), from the release
# binaries `cargo build --release` left in the target directory:
#
#   scripts/install.sh [--destdir DIR] [--prefix /usr] [--target-dir DIR]
#
#   PREFIX/sbin/blockd, PREFIX/sbin/blockctl
#   /lib/systemd/system/blockd@.service, blockd-attach@.service
#                         (PREFIX/lib/systemd/system for a prefix other than /usr)
#   /usr/lib/ocf/resource.d/blockd/{blockd,crm-fence-peer,crm-unfence-peer}
#                         (OCF_ROOT is /usr/lib/ocf whatever the prefix)
#   PREFIX/share/man/man8/blockd.8, blockctl.8, PREFIX/share/man/man5/blockd.toml.5
#   PREFIX/share/bash-completion/completions/{blockctl,blockd}
#   PREFIX/share/zsh/vendor-completions/{_blockctl,_blockd}
#   PREFIX/share/fish/vendor_completions.d/{blockctl,blockd}.fish
#   PREFIX/share/blockd/{grafana-dashboard.json,prometheus-alerts.yml}
#   /etc/blockd/r0.toml.example
#
# Everything goes under DESTDIR when given (staging, packaging). It installs files
# only: it never starts, stops or enables anything, and never touches a config
# (/etc/blockd/*.toml) or a running resource. The Debian package (scripts/deb.sh)
# installs the same files.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

destdir="" prefix="/usr" target="${CARGO_TARGET_DIR:-$repo/target}"
while (($#)); do
    case "$1" in
        --destdir) destdir="${2:?--destdir needs a directory}"; shift 2 ;;
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --target-dir) target="${2:?--target-dir needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac
prefix="${prefix%/}"

bin="$target/release"
for b in blockd blockctl blockd-docgen; do
    if [[ ! -x "$bin/$b" ]]; then
        echo "install.sh: $bin/$b is missing: build first with cargo build --release" >&2
        exit 1
    fi
done

if [[ "$prefix" == /usr ]]; then unitdir=/lib/systemd/system; else unitdir="$prefix/lib/systemd/system"; fi
ocfdir=/usr/lib/ocf/resource.d/blockd
share="$prefix/share"

docs="$(mktemp -d)"
trap 'rm -rf "$docs"' EXIT
"$bin/blockd-docgen" "$docs"

put() { # MODE SOURCE DEST
    install -D -m "$1" "$2" "$destdir$3"
}
put 755 "$bin/blockd" "$prefix/sbin/blockd"
put 755 "$bin/blockctl" "$prefix/sbin/blockctl"
for unit in blockd@.service blockd-attach@.service; do
    # The units name the binaries by their installed path.
    sed "s|/usr/sbin/|$prefix/sbin/|g" "$repo/packaging/systemd/$unit" >"$docs/$unit"
    put 644 "$docs/$unit" "$unitdir/$unit"
done
for agent in blockd crm-fence-peer crm-unfence-peer; do
    put 755 "$repo/ocf/$agent" "$ocfdir/$agent"
done
put 644 "$docs/blockd.8" "$share/man/man8/blockd.8"
put 644 "$docs/blockctl.8" "$share/man/man8/blockctl.8"
put 644 "$docs/blockd.toml.5" "$share/man/man5/blockd.toml.5"
for prog in blockctl blockd; do
    put 644 "$docs/$prog.bash" "$share/bash-completion/completions/$prog"
    put 644 "$docs/_$prog" "$share/zsh/vendor-completions/_$prog"
    put 644 "$docs/$prog.fish" "$share/fish/vendor_completions.d/$prog.fish"
done
put 644 "$repo/monitoring/grafana-dashboard.json" "$share/blockd/grafana-dashboard.json"
put 644 "$repo/monitoring/prometheus-alerts.yml" "$share/blockd/prometheus-alerts.yml"
put 644 "$repo/packaging/r0.toml.example" /etc/blockd/r0.toml.example
echo "installed blockd into ${destdir:-/} (prefix $prefix)"
