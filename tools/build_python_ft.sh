#!/usr/bin/env bash
# Build (once per machine) a free-threaded CPython 3.13 ("3.13t", configured with --disable-gil)
# from Debian trixie's python3.13 source package, into a cache outside the tree keyed by version.
# Prints the interpreter's path on stdout; everything else goes to stderr.
#
# The system's apt configuration is left alone: a private sources list, list directory and
# download directory (all under the cache) are passed to apt-get with -o options.
#
# Environment:
#   FT_PY_VERSION  upstream version expected in the source package (default 3.13.5)
#   FT_CACHE       cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/batched_fn)
#   FT_JOBS        make -j (default: number of CPUs)
set -euo pipefail

version="${FT_PY_VERSION:-3.13.5}"
cache="${FT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/batched_fn}"
prefix="$cache/cpython-${version}t"
python="$prefix/bin/python3.13t"
jobs="${FT_JOBS:-$(nproc 2>/dev/null || echo 2)}"

if [ -x "$python" ] && "$python" -c 'import sys, sysconfig; sys.exit(0 if sysconfig.get_config_var("Py_GIL_DISABLED") else 1)' 2>/dev/null; then
    echo "$python"
    exit 0
fi

log() { echo "build_python_ft: $*" >&2; }
work="$cache/src-${version}"
apt_dir="$cache/apt"
mkdir -p "$work" "$apt_dir/lists/partial" "$apt_dir/archives/partial"

# The mirror this machine already uses (first URIs:/deb line found), with trixie's sources.
mirror="$(grep -hoE '^(URIs:[[:space:]]*|deb[[:space:]]+)https?://[^[:space:]]+/debian/?' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
          | head -n1 | sed -E 's/^(URIs:[[:space:]]*|deb[[:space:]]+)//' || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
echo "deb-src $mirror trixie main" > "$apt_dir/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache::Archives=$apt_dir/archives"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
)

tarball="$(ls "$work"/python3.13_"$version"*.orig.tar.* 2>/dev/null | head -n1 || true)"
if [ -z "$tarball" ]; then
    log "fetching python3.13 source package from $mirror (trixie)"
    apt-get "${apt_opts[@]}" -q update >&2
    (cd "$work" && apt-get "${apt_opts[@]}" -q source --download-only python3.13 >&2)
    tarball="$(ls "$work"/python3.13_*.orig.tar.* | head -n1)"
fi
log "source: $tarball"

# The upstream tarball only (Debian's patches are for Debian's own layout, not needed here).
srcdir="$work/Python-$version"
if [ ! -f "$srcdir/configure" ]; then
    rm -rf "$srcdir"
    tar -xf "$tarball" -C "$work"
    found="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'Python-*' | head -n1)"
    [ "$found" = "$srcdir" ] || mv "$found" "$srcdir"
fi

build="$work/build"
rm -rf "$build" "$prefix"
mkdir -p "$build"
log "configure --disable-gil --prefix=$prefix (make -j$jobs; takes several minutes)"
(cd "$build" && "$srcdir/configure" --disable-gil --prefix="$prefix" --with-ensurepip=install >&2 \
    && make -j"$jobs" >&2 && make install >&2)
"$python" -c 'import sys, sysconfig; assert sysconfig.get_config_var("Py_GIL_DISABLED"), "not a free-threaded build"' >&2
rm -rf "$build"
log "done: $python"
echo "$python"
