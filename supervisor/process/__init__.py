"""Worker processes: spawning and watching one, its states, the standby pool, its output, the build check."""
