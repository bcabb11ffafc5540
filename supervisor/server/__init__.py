"""The daemon: its main loop, security (tokens, TLS), metrics, systemd notify, logs, liveness. What it speaks is in api/."""
