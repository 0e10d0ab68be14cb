"""Shared logic of the trigger and job-state functions: events, manifests, the run lock, the launchers."""
