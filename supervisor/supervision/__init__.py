"""Keeping a model's replicas as they should be: the replica, its recycles, the watchdog pass, the thermal gate."""
