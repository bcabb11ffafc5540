"""Decisions as pure functions of measurements and settings: the policies, the memory estimate, the memory lines."""
