#!/bin/sh
# Releases side by side under $OPENSENSE_ROOT (default /opt/opensense):
#   releases/<version>/   a checkout with its own .venv
#   current  -> releases/<version>     what the service runs
#   previous -> releases/<version>     what `rollback` goes back to
#
#   release.sh install <version> <source dir>   copy, build .venv, switch, restart
#   release.sh rollback                         switch back to previous, restart
#   release.sh status                           print current and previous
#
# Migrations are additive (docs/operations.md), so the previous release runs on the
# schema the current one left: rollback never touches the database.
set -eu

ROOT=${OPENSENSE_ROOT:-/opt/opensense}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
UNIT=${OPENSENSE_UNIT:-opensense}

switch() { # atomically repoint $ROOT/$1 at $2
	ln -sfn "$2" "$ROOT/$1.tmp"
	mv -T "$ROOT/$1.tmp" "$ROOT/$1"
}

case "${1:-}" in
install)
	version=$2 src=$3
	dest="$ROOT/releases/$version"
	[ -e "$dest" ] && { echo "release.sh: $dest exists" >&2; exit 1; }
	mkdir -p "$ROOT/releases"
	cp -a "$src" "$dest"
	if [ -z "${SKIP_VENV:-}" ]; then
		python3 -m venv "$dest/.venv"
		"$dest/.venv/bin/pip" install -q "$dest"
	fi
	if [ -L "$ROOT/current" ]; then
		switch previous "$(readlink "$ROOT/current")"
	fi
	switch current "$dest"
	$SYSTEMCTL restart "$UNIT"
	echo "current: $dest"
	;;
rollback)
	[ -L "$ROOT/previous" ] || { echo "release.sh: no previous release to roll back to" >&2; exit 1; }
	prev=$(readlink "$ROOT/previous")
	cur=$(readlink "$ROOT/current")
	switch current "$prev"
	switch previous "$cur"
	$SYSTEMCTL restart "$UNIT"
	echo "rolled back: current $prev (was $cur)"
	;;
status)
	echo "current:  $(readlink "$ROOT/current" 2>/dev/null || echo none)"
	echo "previous: $(readlink "$ROOT/previous" 2>/dev/null || echo none)"
	;;
*)
	echo "usage: release.sh install <version> <source dir> | rollback | status" >&2
	exit 2
	;;
esac
