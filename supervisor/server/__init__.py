"""The daemon and what it speaks: its main loop, the gRPC API and its checks, security, metrics, systemd notify, logs, liveness."""
