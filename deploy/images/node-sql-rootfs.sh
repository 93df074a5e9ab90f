#!/bin/sh
# The slim node's runtime root fs, distroless-style (node-sql.Dockerfile): lays out in $1
# only what `bulle node serve|doctor` runs — python3.11 and its pruned standard library,
# the venv at /opt/bulle, the shared libraries found by an ldd closure over every ELF file
# copied (nothing listed by hand but libgcc_s, which glibc dlopens to unwind threads), CA
# certificates, the time zone database (Arrow's timestamp kernels read it), ldconfig and
# its cache (ctypes.util.find_library runs it: bulle_cli.tune_malloc), the uid/gid 10001
# user and a 1777 /tmp. No shell, no package manager: the image's commands and the
# deploy files run `bulle …` or `python …` directly.
# Runs in the build stage, whose root fs is the base image plus the venv.
set -eu
cd /  # cp --parents resolves the sources from here
dest=$1
venv=/opt/bulle
[ ! -e "$dest" ] || { echo "$dest exists" >&2; exit 1; }
# The venv's interpreter and standard library, wherever the base keeps them (Debian's
# /usr, the python image's /usr/local).
exe=$(readlink -f "$venv/bin/python3")
stdlib=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
mkdir -p "$dest/usr/bin" "$dest/usr/lib" "$dest/usr/lib64" "$dest/usr/sbin" "$dest/etc" \
  "$dest/tmp" "$dest/var/lib/bulle"
for d in bin lib lib64 sbin; do ln -s "usr/$d" "$dest/$d"; done  # merged /usr, as Debian
chmod 1777 "$dest/tmp"
# Paths under the merged-/usr symlinks, spelled through /usr so that cp --parents makes
# real directories only where the base has them.
copy() {
  for f in "$@"; do
    cp -a --parents "$(echo "$f" | sed 's#^/\(lib\|lib64\|bin\|sbin\)/#/usr/\1/#')" "$dest"
  done
}

copy "$venv" "$stdlib" /sbin/ldconfig /etc/ld.so.conf /etc/ld.so.conf.d /etc/nsswitch.conf \
  /etc/os-release /usr/lib/os-release /etc/ssl /usr/lib/ssl /usr/share/ca-certificates
for f in /usr/local/share/ca-certificates /usr/share/zoneinfo; do [ ! -e "$f" ] || copy "$f"; done
p=$venv/bin/python3  # the symlinks from the venv to the interpreter, each hop
while [ -L "$p" ]; do
  t=$(readlink "$p"); case $t in /*) ;; *) t=$(dirname "$p")/$t ;; esac
  copy "$t"; p=$t
done
# What a node never imports: the standard library's tests, tools, GUI, installers and
# terminal modules (their libraries — readline, ncurses, Berkeley DB — then stay out too).
(cd "$dest$stdlib" && rm -rf test lib2to3 pydoc_data idlelib tkinter turtledemo \
  turtle.py ensurepip venv distutils curses dbm config-3.* \
  lib-dynload/_test* lib-dynload/_ctypes_test* lib-dynload/xx* lib-dynload/_xx* \
  lib-dynload/_curses* lib-dynload/readline* lib-dynload/_dbm* lib-dynload/nis* \
  lib-dynload/ossaudiodev* lib-dynload/audioop* lib-dynload/_crypt*)
# The venv's installer-era scripts (activate, f2py, …): only `bulle` and python run.
find "$dest$venv/bin" -type f ! -name bulle -delete

# The shared-library closure: ldd lists the whole dependency tree of each file; libraries
# the venv carries itself (RPATH $ORIGIN) are already inside $dest.
libs=$(mktemp)
{ echo "$dest$exe"; find "$dest" -type f \( -name '*.so' -o -name '*.so.[0-9]*' \); } \
  | xargs -d '\n' ldd 2>/dev/null | awk -v dest="$dest" '
    /=> not found/ { print "MISSING " $1; next }
    $2 == "=>" && $3 ~ /^\// && index($3, dest) != 1 { print $3 }
    $1 ~ /^\// && $2 ~ /^\(/ && index($1, dest) != 1 { print $1 }' | sort -u >"$libs"
if grep MISSING "$libs"; then exit 1; fi
arch=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH"))')
echo "/usr/lib/$arch/libgcc_s.so.1" >>"$libs"
while read -r lib; do copy "$lib" "$(readlink -f "$lib")"; done <"$libs"
rm "$libs"
ldconfig -r "$dest"

printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nbulle:x:10001:10001:bulle:/var/lib/bulle:/usr/sbin/nologin\n' \
  >"$dest/etc/passwd"
printf 'root:x:0:\nbulle:x:10001:\n' >"$dest/etc/group"
chown 10001:10001 "$dest/var/lib/bulle"
