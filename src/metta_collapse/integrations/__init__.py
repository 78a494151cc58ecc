"""Adapters that run the collapse inside other trainers; each imports its trainer lazily."""
