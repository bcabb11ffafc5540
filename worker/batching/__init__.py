"""Continuous batching: many requests in one worker over one fixed KV pool (plan: pure; loop: acts)."""
