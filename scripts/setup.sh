#!/bin/sh
# Installs what reprobuild needs on a new Debian 12 machine, into ./.venv.
#   scripts/setup.sh          the tool and the host programs its shipped recipes use
#   scripts/setup.sh --test   also the reference tools and Python packages the tests use
# The venv is made from Debian's /usr/bin/python3 so that an unprivileged uid can run it.
set -eu
cd "$(dirname "$0")/.."

with_tests=no
[ "${1:-}" = "--test" ] && with_tests=yes

runtime_debs="python3-venv python3-dev gcc busybox-static ca-certificates"
test_debs="e2fsprogs squashfs-tools erofs-utils cryptsetup-bin fsverity gdisk fdisk
  bubblewrap cpio tar util-linux mmdebstrap diffoscope-minimal zstd xz-utils lz4
  nginx-light nodejs curl"
# The FAT writer's oracles: fsck.fat, mtools' mdir and mcopy, a QEMU guest's kernel, OVMF.
test_debs="$test_debs dosfstools mtools qemu-system-x86 ovmf"
# Boot tests (`reprobuild test`): QEMU and its UEFI firmware.
test_debs="$test_debs qemu-system-x86 ovmf"

debs=$runtime_debs
[ "$with_tests" = yes ] && debs="$debs $test_debs"

missing=""
for deb in $debs; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" \
    || missing="$missing $deb"
done
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
# The cache tests' S3 server is an npm package: npm comes with nodesource's nodejs, or
# as Debian's own package.
if [ "$with_tests" = yes ] && ! command -v npm >/dev/null 2>&1; then
  missing="$missing npm"
fi
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# The editable install is a plain path in a .pth file (setuptools' "compat" mode): the
# default mode imports a finder module, and pathlib with it, at every start of the
# interpreter (~13 ms of each command). A setuptools without that mode gets the default.
spec=.
[ "$with_tests" = yes ] && spec='.[test]'
pip_install=".venv/bin/python -m pip install -q --disable-pip-version-check"
$pip_install --config-settings editable_mode=compat --editable "$spec" 2>/dev/null \
  || $pip_install --editable "$spec"
# An editable install compiles no bytecode (a wheel's install does): compiled here, a
# command does not compile its modules at every start where __pycache__ is not written
# (PYTHONDONTWRITEBYTECODE; ~30 ms of each command). A changed module is recompiled.
.venv/bin/python -m compileall -q -j 0 reprobuild sandbox >/dev/null
if [ "$with_tests" = yes ] && [ ! -x .venv/s3rver/node_modules/.bin/s3rver ]; then
  # s3rver: an S3-compatible server (buckets kept in a directory) for the cache tests.
  npm install --silent --no-audit --no-fund --prefix .venv/s3rver s3rver@3.7.1 >/dev/null
fi
echo "setup: done (.venv/bin/reprobuild)"
