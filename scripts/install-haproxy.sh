#!/usr/bin/env bash
# install-haproxy.sh - put a working HAProxy >= 3.0 (with reverse HTTP,
# i.e. `rhttp@` servers and `attach-srv`) at a known path for rhttp-wsgi.
#
# Usage:  scripts/install-haproxy.sh            (run as root; CI runs as root)
#         HAPROXY_PREFIX=/some/dir scripts/install-haproxy.sh
#         HAPROXY_SUITE=sid HAPROXY_PREFIX=/opt/rhttp-haproxy-new scripts/install-haproxy.sh
#           (a newer HAProxy from another Debian suite, always by the private
#           apt configuration below; docs/haproxy-drain.md measured 3.2 so)
#
# Result: "$PREFIX/bin/haproxy" (PREFIX defaults to /opt/rhttp-haproxy), a tiny
# wrapper that `exec`s the real binary with all arguments passed through, so
# the PID you get (e.g. `$!`) is HAProxy's own PID and signals reach it.
#
# How it gets HAProxy:
#   * Debian 13 (trixie) or newer: `apt-get install -y haproxy`; the wrapper
#     execs /usr/sbin/haproxy.
#   * Debian 12 (bookworm): the system is NOT modified. A private apt
#     configuration (own sources list, lists, cache, empty dpkg status,
#     under a temp dir) points at the trixie suites of the mirror already
#     configured in /etc/apt (same URIs and Signed-By keyring, only the suite
#     changes). haproxy and the library packages it needs (libc6 included)
#     are fetched with `apt-get download`, unpacked with `dpkg -x` into
#     "$PREFIX/root", and the wrapper runs the binary through trixie's own
#     dynamic loader with --library-path pointing only into "$PREFIX/root".
#     Nothing is installed into the system and the system libc is untouched.
#
# Idempotent: if "$PREFIX/bin/haproxy -v" already reports >= 3.0 it exits 0
# immediately. Set HAPROXY_FORCE=1 to reinstall.
#
# At the end it verifies the install: `haproxy -vv`, a config check (-c) of a
# config using `expose-experimental-directives`, a `server ... rhttp@` and
# `tcp-request session attach-srv` on an `ssl crt ... alpn h2` bind (throwaway
# self-signed cert), then runs that config for real in the foreground (-db)
# on 127.0.0.1, checks it listens and completes a TLS handshake, and stops it
# by PID.
#
# Caveats for configs run with this HAProxy:
#   * Don't use `chroot`, `user`/`group` or `daemon` in test configs; no
#     /var/lib/haproxy or /run/haproxy is created on Debian 12 (on Debian 13
#     the package creates them, but tests should not rely on them).
#   * On Debian 12 /proc/<pid>/exe of the process is trixie's ld-linux, not
#     haproxy, and /proc/<pid>/cmdline starts with the loader and its options;
#     match processes by PID, not by exe/name. argv[0] as seen by haproxy is
#     the wrapper, so master-worker (-W) re-exec/reload goes through it and
#     keeps the master PID (checked below).
#   * OpenSSL (trixie's 3.5) still reads the system's /usr/lib/ssl/openssl.cnf
#     and CA directory; that is harmless with the default bookworm config.
set -euo pipefail

PREFIX="${HAPROXY_PREFIX:-/opt/rhttp-haproxy}"
case "$PREFIX" in /*) ;; *) PREFIX="$PWD/$PREFIX" ;; esac
case "$PREFIX" in *"'"*|*'"'*|*'$'*|*'\'*|*'`'*)
    echo "[install-haproxy] ERROR: HAPROXY_PREFIX must not contain quotes, \$, \\ or backquotes" >&2; exit 1 ;;
esac
WRAPPER="$PREFIX/bin/haproxy"
ROOT="$PREFIX/root"
MIN_MAJOR=3
MIN_MINOR=0

log() { printf '[install-haproxy] %s\n' "$*" >&2; }
die() { printf '[install-haproxy] ERROR: %s\n' "$*" >&2; exit 1; }

# Prints the version reported by "$1 -v" (e.g. 3.0.11-1+deb13u5); fails if none.
haproxy_version() {
    local out
    out="$("$@" -v 2>/dev/null)" || return 1
    out="$(printf '%s\n' "$out" | sed -n 's/^HA-\{0,1\}Proxy version \([^ ]*\).*/\1/p' | head -n1)"
    [ -n "$out" ] || return 1
    printf '%s\n' "$out"
}

# True if version string $1 is >= MIN_MAJOR.MIN_MINOR.
version_ok() {
    local major minor
    major="$(printf '%s' "$1" | sed -n 's/^\([0-9]*\)\.\([0-9]*\).*/\1/p')"
    minor="$(printf '%s' "$1" | sed -n 's/^\([0-9]*\)\.\([0-9]*\).*/\2/p')"
    [ -n "$major" ] && [ -n "$minor" ] || return 1
    [ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -ge "$MIN_MINOR" ]; }
}

# ---------------------------------------------------------------- fast path
if [ "${HAPROXY_FORCE:-0}" != 1 ] && [ -x "$WRAPPER" ]; then
    if v="$(haproxy_version "$WRAPPER")" && version_ok "$v"; then
        log "HAProxy $v already installed at $WRAPPER"
        printf '%s\n' "$v"
        exit 0
    fi
fi

mkdir -p "$PREFIX/bin"
# Serialise concurrent runs.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$PREFIX/.install.lock"
    flock 9
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/install-haproxy.XXXXXX")"
VERIFY_PID=""
cleanup() {
    if [ -n "$VERIFY_PID" ] && kill -0 "$VERIFY_PID" 2>/dev/null; then
        kill "$VERIFY_PID" 2>/dev/null || true
        wait "$VERIFY_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# Writes "$WRAPPER" atomically with the given body (after the shebang).
write_wrapper() {
    {
        printf '#!/bin/sh\n'
        printf '# Generated by rhttp-wsgi scripts/install-haproxy.sh - do not edit.\n'
        printf '%s\n' "$@"
    } >"$WRAPPER.new"
    chmod 0755 "$WRAPPER.new"
    mv -f "$WRAPPER.new" "$WRAPPER"
}

[ -r /etc/os-release ] || die "/etc/os-release not found; only Debian 12/13 are supported"
# shellcheck disable=SC1091
OS_ID="$(. /etc/os-release && printf '%s' "${ID:-}")"
# shellcheck disable=SC1091
OS_CODENAME="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
DEB_MAJOR=""
if [ -r /etc/debian_version ]; then
    DEB_MAJOR="$(sed -n 's/^\([0-9][0-9]*\).*/\1/p' /etc/debian_version | head -n1)"
fi
if [ -z "$DEB_MAJOR" ]; then
    # testing/sid report a codename in debian_version (e.g. "trixie/sid").
    case "$OS_CODENAME" in
        bookworm) DEB_MAJOR=12 ;;
        trixie) DEB_MAJOR=13 ;;
        forky|sid) DEB_MAJOR=14 ;;
    esac
fi
[ "$OS_ID" = debian ] || die "unsupported OS '$OS_ID' (need Debian 12 or 13)"
[ -n "$DEB_MAJOR" ] || die "cannot determine the Debian release"
log "detected Debian $DEB_MAJOR ($OS_CODENAME), prefix $PREFIX"

# ------------------------------------------------------- Debian 13 or newer
install_from_system_apt() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show haproxy >/dev/null 2>&1; then
        apt-get update
    fi
    # Don't let the package start/enable the system haproxy service during
    # installation (only if no policy-rc.d exists already).
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    local rc=0
    apt-get install -y --no-install-recommends haproxy || rc=$?
    if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi
    [ "$rc" = 0 ] || die "apt-get install haproxy failed"
    [ -x /usr/sbin/haproxy ] || die "/usr/sbin/haproxy missing after apt-get install"
    write_wrapper 'exec /usr/sbin/haproxy "$@"'
}

# ----------------------------------------------------------------- Debian 12
# Prints "URI SUITE SIGNED-BY" (SIGNED-BY may be "-") for every enabled
# `deb` entry of the system apt configuration.
system_apt_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk '
            { sub(/#.*/, "") }
            $1 != "deb" { next }
            {
                i = 2; sb = "-"
                if ($i ~ /^\[/) {
                    opts = ""
                    while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } ; i++ }
                    gsub(/[\[\]]/, " ", opts)
                    n = split(opts, o, /[ \t]+/)
                    for (k = 1; k <= n; k++) if (o[k] ~ /^signed-by=/) { sb = substr(o[k], 11) }
                }
                uri = $i; suite = $(i + 1)
                if (uri != "" && suite != "") print uri, suite, sb
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk '
            function flush(   nu, ns, a, b, x, y) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
                    nu = split(uris, a, /[ \t]+/); ns = split(suites, b, /[ \t]+/)
                    for (x = 1; x <= nu; x++) for (y = 1; y <= ns; y++)
                        if (a[x] != "" && b[y] != "") print a[x], b[y], (sb == "" ? "-" : sb)
                }
                types = uris = suites = sb = enabled = ""; field = ""
            }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ {   # continuation line (e.g. multi-line inline key)
                if (field == "signed-by") sb = "-"
                next
            }
            {
                field = tolower($0); sub(/:.*/, "", field)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
                if (field == "types") types = val
                else if (field == "uris") uris = val
                else if (field == "suites") suites = val
                else if (field == "enabled") enabled = val
                else if (field == "signed-by") sb = (val ~ /^\// ? val : "-")
            }
            END { flush() }' "$f"
    done
}

install_from_trixie_debs() {
    local host_codename="${OS_CODENAME:-bookworm}" target="${HAPROXY_SUITE:-trixie}"
    local apt_dir="$TMP/apt" debs="$TMP/debs" newroot="$PREFIX/root.new"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" \
        "$apt_dir/sources.list.d" "$apt_dir/preferences.d" "$debs"
    : >"$apt_dir/status"

    # Mirror the system's Debian archive entries, switching only the suite.
    local uri suite sb newsuite line
    : >"$apt_dir/sources.list"
    while read -r uri suite sb; do
        case "$suite" in
            "$host_codename") newsuite="$target" ;;
            # (sid has no -security or -updates suites)
            "$host_codename"-security) [ "$target" != sid ] || continue; newsuite="$target-security" ;;
            "$host_codename"-updates) [ "$target" != sid ] || continue; newsuite="$target-updates" ;;
            *) continue ;;
        esac
        if [ "$sb" = - ] || [ ! -r "$sb" ]; then
            line="deb $uri $newsuite main"
        else
            line="deb [signed-by=$sb] $uri $newsuite main"
        fi
        grep -qxF "$line" "$apt_dir/sources.list" || printf '%s\n' "$line" >>"$apt_dir/sources.list"
    done < <(system_apt_entries)
    grep -q " $target main\$" "$apt_dir/sources.list" \
        || die "no '$host_codename' Debian archive entry found in /etc/apt to derive a $target source from"
    log "private apt sources:"
    sed 's/^/    /' "$apt_dir/sources.list" >&2

    local -a APT=(
        -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
        -o "Dir::Etc::sourceparts=$apt_dir/sources.list.d"
        -o "Dir::Etc::preferences=$apt_dir/preferences"
        -o "Dir::Etc::preferencesparts=$apt_dir/preferences.d"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::State::status=$apt_dir/status"
        -o "Dir::State::extended_states=$apt_dir/extended_states"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Dir::Cache::archives=$apt_dir/cache/archives"
        -o "Dir::Cache::pkgcache=$apt_dir/cache/pkgcache.bin" -o "Dir::Cache::srcpkgcache=$apt_dir/cache/srcpkgcache.bin"
        -o "APT::Sandbox::User=root"
        -o "APT::Get::List-Cleanup=false"
        -o "Acquire::Languages=none"
    )
    log "apt-get update (private $target configuration)"
    apt-get -q "${APT[@]}" update >&2 || die "apt-get update of the private $target sources failed"

    # Library closure of haproxy: follow Depends/PreDepends, keeping only
    # shared-library packages (lib*, zlib1g). Verified below with ld.so --list.
    local -a queue=(haproxy) wanted=()
    local -A seen=([haproxy]=1)
    local pkg dep
    while [ "${#queue[@]}" -gt 0 ]; do
        pkg="${queue[0]}"; queue=("${queue[@]:1}")
        wanted+=("$pkg")
        while read -r dep; do
            case "$dep" in lib*|zlib1g) ;; *) continue ;; esac
            [ -n "${seen[$dep]:-}" ] && continue
            seen[$dep]=1
            queue+=("$dep")
        done < <(apt-cache "${APT[@]}" depends --important "$pkg" \
                    | sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^<][^ ]*\)$/\2/p')
    done
    log "downloading from $target: ${wanted[*]}"
    (cd "$debs" && apt-get -q "${APT[@]}" download "${wanted[@]}" >&2) \
        || die "apt-get download failed"

    rm -rf "$newroot"
    mkdir -p "$newroot"
    local deb
    for deb in "$debs"/*.deb; do
        dpkg -x "$deb" "$newroot"
    done
    [ -x "$newroot/usr/sbin/haproxy" ] || die "haproxy binary missing from the downloaded package"

    # Locate trixie's loader and library dirs inside the new root (usrmerge:
    # the loader may be in usr/lib64, lib64 or the multiarch dir, and
    # symlinks may be absolute, so only accept regular files).
    local libc libdir loader_name loader_rel="" cand
    libc="$(find "$newroot" -name libc.so.6 \( -type f -o -type l \) | head -n1)"
    [ -n "$libc" ] || die "libc.so.6 not found in the extracted libc6 package"
    libdir="${libc%/libc.so.6}"
    libdir="${libdir#"$newroot"/}"                    # e.g. usr/lib/x86_64-linux-gnu
    local multiarch="${libdir##*/}"
    case "$multiarch" in
        x86_64-linux-gnu) loader_name=ld-linux-x86-64.so.2 ;;
        aarch64-linux-gnu) loader_name=ld-linux-aarch64.so.1 ;;
        *) loader_name="$(cd "$newroot/$libdir" && ls ld-linux*.so.* 2>/dev/null | head -n1)" ;;
    esac
    for cand in usr/lib64 lib64 usr/lib lib "usr/lib/$multiarch" "lib/$multiarch"; do
        if [ -f "$newroot/$cand/$loader_name" ] && [ ! -L "$newroot/$cand/$loader_name" ]; then
            loader_rel="$cand/$loader_name"; break
        fi
    done
    if [ -z "$loader_rel" ]; then
        for cand in usr/lib64 lib64 usr/lib lib "usr/lib/$multiarch" "lib/$multiarch"; do
            if [ -e "$newroot/$cand/$loader_name" ]; then
                cand="$(readlink -f "$newroot/$cand/$loader_name")"
                case "$cand" in "$newroot"/*) loader_rel="${cand#"$newroot"/}"; break ;; esac
            fi
        done
    fi
    [ -n "$loader_rel" ] || die "trixie dynamic loader $loader_name not found under $newroot"

    local libs_rel="" d
    for d in "usr/lib/$multiarch" "lib/$multiarch" usr/lib lib; do
        if [ -d "$newroot/$d" ] && [ ! -L "$newroot/$d" ]; then
            libs_rel="${libs_rel:+$libs_rel:}\$ROOT/$d"
        fi
    done

    # Check that every needed library resolves inside the new root.
    local libs_new list
    libs_new="$(printf '%s' "$libs_rel" | sed "s|\\\$ROOT|$newroot|g")"
    list="$("$newroot/$loader_rel" --inhibit-cache --library-path "$libs_new" \
                --list "$newroot/usr/sbin/haproxy" 2>&1)" \
        || die "trixie loader cannot load haproxy:"$'\n'"$list"
    if printf '%s\n' "$list" | grep -q 'not found'; then
        die "unresolved libraries for haproxy:"$'\n'"$list"
    fi
    if printf '%s\n' "$list" | grep '=>' | grep -v "=> $newroot/" | grep -q .; then
        die "haproxy would load libraries from outside $newroot:"$'\n'"$list"
    fi

    # Swap the new root into place and write the wrapper.
    rm -rf "$ROOT.old"
    if [ -e "$ROOT" ]; then mv "$ROOT" "$ROOT.old"; fi
    mv "$newroot" "$ROOT"
    rm -rf "$ROOT.old"
    # --argv0: haproxy re-execs argv[0] (master-worker mode, -W), which must
    # go through this wrapper again rather than the bare binary.
    write_wrapper \
        "ROOT='$ROOT'" \
        "exec \"\$ROOT/$loader_rel\" --inhibit-cache --library-path \"$libs_rel\" --argv0 '$WRAPPER' \"\$ROOT/usr/sbin/haproxy\" \"\$@\""
}

start_ts=$(date +%s)
if [ -n "${HAPROXY_SUITE:-}" ] && [ "$DEB_MAJOR" -ge 12 ]; then
    install_from_trixie_debs
elif [ "$DEB_MAJOR" -ge 13 ]; then
    install_from_system_apt
elif [ "$DEB_MAJOR" -eq 12 ]; then
    install_from_trixie_debs
else
    die "unsupported Debian release $DEB_MAJOR (need 12 or 13)"
fi

# ------------------------------------------------------------------ verify
VERSION="$(haproxy_version "$WRAPPER")" || die "$WRAPPER -v does not report a version"
version_ok "$VERSION" || die "installed HAProxy $VERSION is older than $MIN_MAJOR.$MIN_MINOR"
"$WRAPPER" -vv >"$TMP/vv" 2>&1 || { cat "$TMP/vv" >&2; die "$WRAPPER -vv failed"; }
grep -q 'OpenSSL' "$TMP/vv" || die "HAProxy was built without OpenSSL"

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        echo $((20000 + RANDOM % 20000))
    fi
}

command -v openssl >/dev/null 2>&1 || die "openssl CLI needed to create a test certificate"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -keyout "$TMP/key.pem" -out "$TMP/crt.pem" >/dev/null 2>&1 \
    || die "openssl could not create a test certificate"
cat "$TMP/crt.pem" "$TMP/key.pem" >"$TMP/site.pem"

TUN_PORT="$(free_port)"
HTTP_PORT="$(free_port)"
while [ "$HTTP_PORT" = "$TUN_PORT" ]; do HTTP_PORT="$(free_port)"; done
cat >"$TMP/haproxy.cfg" <<EOF
global
    expose-experimental-directives

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend fe_tunnel
    bind 127.0.0.1:$TUN_PORT ssl crt $TMP/site.pem alpn h2
    tcp-request session attach-srv be_rhttp/s

frontend fe_public
    bind 127.0.0.1:$HTTP_PORT
    default_backend be_rhttp

backend be_rhttp
    server s rhttp@
EOF

"$WRAPPER" -c -f "$TMP/haproxy.cfg" >"$TMP/check.log" 2>&1 \
    || { cat "$TMP/check.log" >&2; die "config check of the rhttp@/attach-srv/ssl test config failed"; }
log "config check with rhttp@ + attach-srv + ssl crt: OK"

"$WRAPPER" -db -f "$TMP/haproxy.cfg" >"$TMP/run.log" 2>&1 &
VERIFY_PID=$!
listening=0
for _ in $(seq 1 50); do
    kill -0 "$VERIFY_PID" 2>/dev/null || break
    if (exec 3<>"/dev/tcp/127.0.0.1/$TUN_PORT") 2>/dev/null; then listening=1; break; fi
    sleep 0.1
done
if [ "$listening" != 1 ]; then
    cat "$TMP/run.log" >&2
    die "haproxy did not start listening on 127.0.0.1:$TUN_PORT"
fi
# The wrapper execs, so $! must be haproxy itself (the PID owning the socket).
if command -v ss >/dev/null 2>&1; then
    ss -Hltnp "sport = :$TUN_PORT" | grep -q "pid=$VERIFY_PID," \
        || die "PID $VERIFY_PID does not own the listening socket (wrapper must exec)"
fi
# Real TLS handshake with ALPN h2 against the ssl bind.
if ! timeout 10 openssl s_client -connect "127.0.0.1:$TUN_PORT" -alpn h2 </dev/null \
        >"$TMP/tls.log" 2>&1 || ! grep -q 'ALPN protocol: h2' "$TMP/tls.log"; then
    cat "$TMP/tls.log" "$TMP/run.log" >&2
    die "TLS handshake with haproxy failed"
fi
sleep 1
kill -0 "$VERIFY_PID" 2>/dev/null || { cat "$TMP/run.log" >&2; die "haproxy exited unexpectedly"; }
kill -TERM "$VERIFY_PID"
rc=0
wait "$VERIFY_PID" || rc=$?
pid="$VERIFY_PID"
VERIFY_PID=""
if kill -0 "$pid" 2>/dev/null; then die "haproxy PID $pid still running after SIGTERM"; fi
log "runtime check (listen + TLS/ALPN h2 handshake + stop by PID, exit $rc): OK"

# Master-worker mode: the master re-execs itself at startup and on SIGUSR2;
# both must keep working through the wrapper, with an unchanged master PID.
"$WRAPPER" -W -db -f "$TMP/haproxy.cfg" >"$TMP/mw.log" 2>&1 &
VERIFY_PID=$!
wait_for_loads() {   # $1 = number of "Loading success" lines to wait for
    local _
    for _ in $(seq 1 100); do
        kill -0 "$VERIFY_PID" 2>/dev/null || return 1
        [ "$(grep -c 'Loading success' "$TMP/mw.log" || true)" -ge "$1" ] && return 0
        sleep 0.1
    done
    return 1
}
wait_for_loads 1 || { cat "$TMP/mw.log" >&2; die "master-worker (-W) start failed"; }
kill -USR2 "$VERIFY_PID"
wait_for_loads 2 || { cat "$TMP/mw.log" >&2; die "master-worker (-W) reload (SIGUSR2) failed"; }
(exec 3<>"/dev/tcp/127.0.0.1/$TUN_PORT") 2>/dev/null \
    || { cat "$TMP/mw.log" >&2; die "not listening after master-worker reload"; }
kill -TERM "$VERIFY_PID"
wait "$VERIFY_PID" || true
VERIFY_PID=""
log "master-worker check (-W start + SIGUSR2 reload, same master PID): OK"

log "installed HAProxy $VERSION at $WRAPPER in $(( $(date +%s) - start_ts ))s"
printf '%s\n' "$VERSION"
