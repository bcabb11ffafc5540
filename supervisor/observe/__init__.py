"""What is measured and told: /proc and NVML reads, the monitor, the event bus and its followers."""
