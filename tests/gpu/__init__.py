"""Opt-in tests on a real NVIDIA GPU (skipped elsewhere): see test_real_gpu.py."""
