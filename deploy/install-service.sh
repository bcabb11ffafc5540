#!/usr/bin/env bash
# Install llm-supervisor as a systemd service from this checkout (run as root, after deploy/setup.sh):
#   bash deploy/install-service.sh            # install, enable and start
# The unit runs the checkout's .venv; the config is /etc/llm-supervisor/config.toml (written from
# deploy/config.example.toml when there is none — edit it, then `systemctl reload llm-supervisor`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "install-service.sh: run as root" >&2; exit 1; }
[ -x "$root/.venv/bin/llm-supervisord" ] || { echo "install-service.sh: run deploy/setup.sh first" >&2; exit 1; }

install -m 0644 "$root/systemd/llm-supervisor.sysusers.conf" /usr/lib/sysusers.d/llm-supervisor.conf
install -m 0644 "$root/systemd/llm-supervisor.tmpfiles.conf" /usr/lib/tmpfiles.d/llm-supervisor.conf
sed "s|/opt/llm-supervisor|$root|g" "$root/systemd/llm-supervisor.service" > /etc/systemd/system/llm-supervisor.service
systemd-sysusers /usr/lib/sysusers.d/llm-supervisor.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/llm-supervisor.conf
[ -e /etc/llm-supervisor/config.toml ] || install -m 0644 "$root/deploy/config.example.toml" /etc/llm-supervisor/config.toml
systemd-analyze verify /etc/systemd/system/llm-supervisor.service
systemctl daemon-reload
systemctl enable --now llm-supervisor
systemctl --no-pager status llm-supervisor || true
