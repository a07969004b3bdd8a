#!/usr/bin/env bash
# `make deb`: dist/carbond_<version>_<arch>.deb, carbond in its own virtual environment under
# /opt/carbond made with Debian's /usr/bin/python3, every dependency inside, so that installing
# it needs no network. The wheels are fetched here, at build time (PyPI, or the index pip is
# configured with). Packaging files: deploy/debian/. docs/deploy.md ("Debian package").
#
#   VERSION_SUFFIX=+test2   appended to the Debian version (a newer build of the same code)
#   DEB_VERSION=0.1.0-3     the whole Debian version instead of <carbond version>-1<suffix>
#   DEB_MAINTAINER='Name <mail>'   default: the author of the checked-out commit
#   OUT_DIR=dist            where the .deb goes (it prints the path last)
#   WORK_DIR=build/deb      the staging tree and wheels (emptied first)
set -euo pipefail
umask 022
root=$(cd "$(dirname "$0")/.." && pwd)
python=/usr/bin/python3          # the venv runs on the target's Debian python3
prefix=/opt/carbond
out_dir=${OUT_DIR:-$root/dist}

for tool in dpkg-deb dpkg-shlibdeps "$python"; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg-dev python3 python3-venv)" >&2; exit 1; }
done
"$python" -c 'import ensurepip, venv' 2>/dev/null \
    || { echo "build-deb: $python has no venv/ensurepip (apt-get install python3-venv)" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/carbond/__init__.py")
[ -n "$version" ] || { echo "build-deb: no __version__ in carbond/__init__.py" >&2; exit 1; }
deb_version=${DEB_VERSION:-$version-1${VERSION_SUFFIX:-}}
arch=$(dpkg --print-architecture)
py_minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
py_next=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct)}
    commit=$(git -C "$root" rev-parse --short=12 HEAD)
    maintainer=${DEB_MAINTAINER:-$(git -C "$root" log -1 --format='%an <%ae>')}
else
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)}
    commit=unknown
    maintainer=${DEB_MAINTAINER:-carbond maintainers <root@localhost>}
fi

work=${WORK_DIR:-$root/build/deb}
rm -rf "$work"
mkdir -p "$work/src" "$work/wheels" "$out_dir"
stage=$work/carbond_${deb_version}_$arch
venv=$stage$prefix

# The sources as committed plus untracked files git does not ignore (never a stale build/).
if [ "$commit" != unknown ]; then
    git -C "$root" ls-files -z -co --exclude-standard \
        | (cd "$root" && xargs -0 tar -c --no-recursion -f - 2>/dev/null) | tar -x -C "$work/src"
else
    tar -C "$root" --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.git -c . \
        | tar -x -C "$work/src"
fi

echo "build-deb: carbond $deb_version ($arch) from $commit, python $py_minor"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
"${pip[@]}" wheel --wheel-dir "$work/wheels" "$work/src"
"${pip[@]}" install --no-index --find-links "$work/wheels" --no-compile "carbond==$version"
"${pip[@]}" uninstall -y pip setuptools >/dev/null
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
rmdir "$venv/include/python$py_minor" "$venv/include"  # headers of packages that have none
find "$venv" -depth -name __pycache__ -type d -exec rm -rf {} +
# The venv names its staging path: point the scripts and pyvenv.cfg at the final one.
grep -rlI -- "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -r sed -i "s|$venv|$prefix|g"
if grep -rlI -- "$stage" "$venv" >/dev/null; then
    echo "build-deb: the staging path is left in: $(grep -rlI -- "$stage" "$venv" | head -3)" >&2
    exit 1
fi
# Files some wheels ship executable (protobuf's modules and metadata): imported or read, never
# run; only the shared objects keep their mode.
find "$venv/lib" -type f -perm /111 ! -name '*.so' -exec chmod a-x {} +
# Shared objects of binary wheels: debug symbols out (lintian: unstripped-binary-or-object).
find "$venv" -name '*.so' -type f -exec strip --strip-unneeded --remove-section=.comment \
    --remove-section=.note {} +
# pip's RECORD of each distribution: the hashes of the files as they now are (the scripts'
# shebangs and the stripped shared objects changed after pip wrote it).
"$python" - "$venv" <<'PY'
import base64, csv, hashlib, io, sys
from pathlib import Path
for record in Path(sys.argv[1]).glob("lib/python*/site-packages/*.dist-info/RECORD"):
    rows = list(csv.reader(io.StringIO(record.read_text())))
    for row in rows:
        path = (record.parent.parent / row[0]).resolve() if row else None
        if path and row[1]:
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            row[1:3] = [f"sha256={digest.decode()}", str(len(data))]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())
PY

debian=$root/deploy/debian
install -d "$stage/lib/systemd/system" "$stage/etc/carbond" "$stage/usr/bin" \
    "$stage/usr/share/doc/carbond" "$stage/usr/share/man/man1" "$stage/DEBIAN" \
    "$stage/usr/share/lintian/overrides"
# The unit's documentation lives where Debian keeps a package's documentation.
sed -e "s|file://$prefix/share/carbond/|file:///usr/share/doc/carbond/|" \
    -e "s|^# carbond: energy and carbon accounting for this host. Installed by \`make install\`|# carbond: energy and carbon accounting for this host. Installed by the carbond package|" \
    "$root/deploy/systemd/carbond.service" > "$stage/lib/systemd/system/carbond.service"
install -m 0644 "$root/deploy/carbond.yaml" "$stage/etc/carbond/carbond.yaml"
ln -s "$prefix/bin/carbond" "$stage/usr/bin/carbond"
install -m 0644 "$root/README.md" "$root/docs/deploy.md" "$stage/usr/share/doc/carbond/"
install -m 0644 "$debian/copyright" "$stage/usr/share/doc/carbond/copyright"
gzip -9n < "$debian/carbond.1" > "$stage/usr/share/man/man1/carbond.1.gz"
install -m 0644 "$debian/lintian-overrides" "$stage/usr/share/lintian/overrides/carbond"
{
    printf 'carbond (%s) unstable; urgency=medium\n\n' "$deb_version"
    printf '  * carbond %s, built from commit %s with Python %s.\n\n' "$version" "$commit" "$py_minor"
    printf ' -- %s  %s\n' "$maintainer" "$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$stage/usr/share/doc/carbond/changelog.Debian.gz"

# Depends: this python3 minor (the venv's site-packages and binary wheels are built for it),
# and what the shared objects of the wheels link against, as dpkg-shlibdeps finds it.
mkdir -p "$work/shlibdeps/debian"
printf 'Source: carbond\n\nPackage: carbond\nArchitecture: any\n' > "$work/shlibdeps/debian/control"
mapfile -t objects < <(find "$venv" -name '*.so' -type f | sort)
shlibs=""
if [ ${#objects[@]} -gt 0 ]; then
    shlibs=$(cd "$work/shlibdeps" && dpkg-shlibdeps -O -l"$venv/lib" "${objects[@]/#/-e}" 2>/dev/null \
        | sed -n 's/^shlibs:Depends=//p')
fi
depends="python3 (>= $py_minor), python3 (<< $py_next)${shlibs:+, $shlibs}"

install -m 0644 "$debian/conffiles" "$stage/DEBIAN/conffiles"
install -m 0755 "$debian/postinst" "$debian/prerm" "$debian/postrm" "$stage/DEBIAN/"
chmod -R u+rwX,go+rX,go-w "$stage"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/md5sums"
size=$(du -s -k --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$deb_version|" -e "s|@ARCH@|$arch|" -e "s|@INSTALLED_SIZE@|$size|" \
    -e "s|@DEPENDS@|$depends|" -e "s|@MAINTAINER@|$maintainer|" \
    "$debian/control.in" > "$stage/DEBIAN/control"
# Reproducible: every mtime clamped to the commit's time; dpkg-deb sorts the members itself.
find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

deb=$out_dir/carbond_${deb_version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
