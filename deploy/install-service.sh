#!/usr/bin/env bash
# Install llm-supervisor as a systemd service, as root, from a checkout anywhere (/root, /home, ...):
#   bash deploy/install-service.sh              # install or upgrade, enable and (re)start
#   bash deploy/install-service.sh --code-only  # only the code and its .venv under the prefix; no systemd
# The service account cannot read a checkout under /root or /home, and the unit's ProtectHome=yes hides
# them anyway, so the unit runs a copy: the files git tracks in this checkout (as they are on disk; never
# .venv, caches or a model left lying there) in /opt/llm-supervisor (LLM_SUPERVISOR_PREFIX overrides it),
# owned by root and readable by all, with a .venv of its own built there by deploy/setup.sh (a venv cannot
# be moved). Upgrade: git pull, then run this again; files gone from the checkout go from the copy.
# The config is /etc/llm-supervisor/config.toml (written from deploy/config.example.toml when there is
# none — edit it, then `systemctl reload llm-supervisor`).
set -euo pipefail
umask 022  # the service account reads everything installed here, the .venv that setup.sh builds included
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$(realpath -m -- "${LLM_SUPERVISOR_PREFIX:-/opt/llm-supervisor}")"
unit_prefix=/opt/llm-supervisor  # the path the unit file names
code_only=false
case "${1-}" in
    "") ;;
    --code-only) code_only=true ;;
    *) echo "usage: install-service.sh [--code-only]" >&2; exit 2 ;;
esac

die() { echo "install-service.sh: $*" >&2; exit 1; }

# What of the unit's sandbox keeps the service from a path; empty when the service sees it.
hidden_by() {
    case "$1/" in
        /root/* | /home/* | /run/user/*) echo ProtectHome=yes ;;
        /tmp/* | /var/tmp/*) echo PrivateTmp=yes ;;
    esac
}

# Checked before anything is touched (and before the root check, so it can be tested unprivileged).
if ! $code_only && [ -n "$(hidden_by "$prefix")" ]; then
    die "$prefix is hidden from the service ($(hidden_by "$prefix")); choose another LLM_SUPERVISOR_PREFIX"
fi
if [ "$prefix" != "$root" ]; then
    case "$prefix/" in "$root"/*) die "the prefix $prefix is inside the checkout $root" ;; esac
    case "$root/" in "$prefix"/*) die "the checkout $root is inside the prefix $prefix" ;; esac
fi
[ "$(id -u)" = 0 ] || die "run as root"

copy_code() {
    local manifest="$prefix/.installed-files" files
    files="$(mktemp)"
    # safe.directory: root reading a checkout its user owns (sudo from /home) is what this script is for.
    git -c safe.directory="$root" -C "$root" rev-parse --git-dir >/dev/null || die "$root is not a git checkout"
    # ls-files still lists tracked files deleted from the working tree: copy what is there.
    git -c safe.directory="$root" -C "$root" ls-files -z --cached |
        (cd "$root" && while IFS= read -r -d '' f; do
             if [ -f "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
         done) | LC_ALL=C sort -zu > "$files"
    install -d -m 0755 "$prefix"
    # Owner and modes set in the archive: a checkout's 0600 files or its user's uid do not leak through.
    tar -C "$root" --null -T "$files" --owner=0 --group=0 --mode=u+rw,go+rX,go-w -cf - | tar -C "$prefix" -xf -
    if [ -f "$manifest" ]; then
        LC_ALL=C comm -z -23 "$manifest" "$files" | (cd "$prefix" && xargs -0 -r rm -f --)
    fi
    install -m 0644 "$files" "$manifest"
    rm -f "$files"
}

# Run as the account the unit names, with as bare an environment as systemd gives it, from a neutral
# directory: the copy must stand on its own, not borrow the checkout through the cwd or PYTHONPATH.
check_runs_as() {
    local user="$1"
    (cd / && runuser -u "$user" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        "$prefix/.venv/bin/llm-supervisord" --help >/dev/null) ||
        die "$user cannot run $prefix/.venv/bin/llm-supervisord (is a directory above $prefix closed to others?)"
    (cd / && runuser -u "$user" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        "$prefix/.venv/bin/python" -c 'import worker.main, llama_cpp') ||
        die "$user cannot import the worker and llama_cpp from $prefix/.venv"
}

if ! $code_only; then
    # The account first: the copy is checked as the account that will run it.
    install -m 0644 "$root/systemd/llm-supervisor.sysusers.conf" /usr/lib/sysusers.d/llm-supervisor.conf
    install -m 0644 "$root/systemd/llm-supervisor.tmpfiles.conf" /usr/lib/tmpfiles.d/llm-supervisor.conf
    systemd-sysusers /usr/lib/sysusers.d/llm-supervisor.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/llm-supervisor.conf
fi

# The real interpreter behind the .venv (a venv only links to it); empty when there is none.
venv_python() { realpath -e "$prefix/.venv/bin/python" 2>/dev/null || true; }

[ "$prefix" = "$root" ] || copy_code
# A venv runs its base interpreter in place: one from pyenv under /root or /home is out of the service's
# reach. So the build sees only the system's python3 (setup.sh installs Debian's when it lacks one), and
# a .venv left on a hidden or vanished interpreter by an earlier run is built afresh.
python="$(venv_python)"
if [ -e "$prefix/.venv" ] && { [ -z "$python" ] || [ -n "$(hidden_by "$python")" ]; }; then
    rm -rf "$prefix/.venv"
fi
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SETUP_EXTRAS= bash "$prefix/deploy/setup.sh"
python="$(venv_python)"
[ -z "$(hidden_by "$python")" ] ||
    die "$prefix/.venv runs $python, hidden from the service ($(hidden_by "$python")); install a system python3 (3.11 or newer)"
# The service cannot write bytecode next to root's read-only code: compile it once here, not at every
# start of the daemon and of each worker.
"$prefix/.venv/bin/python" -m compileall -q "$prefix/supervisor" "$prefix/worker" "$prefix/protos"
if $code_only; then
    check_runs_as nobody
    echo "install-service.sh: code installed in $prefix" >&2
    exit 0
fi
check_runs_as llm-supervisor

sed "s|$unit_prefix|$prefix|g" "$root/systemd/llm-supervisor.service" > /etc/systemd/system/llm-supervisor.service
[ -e /etc/llm-supervisor/config.toml ] || install -m 0644 "$root/deploy/config.example.toml" /etc/llm-supervisor/config.toml
systemd-analyze verify /etc/systemd/system/llm-supervisor.service
systemctl daemon-reload
systemctl enable llm-supervisor
# restart, not start: a second run is an upgrade, and the running daemon still has the old code loaded.
systemctl restart llm-supervisor
systemctl --no-pager status llm-supervisor || true
