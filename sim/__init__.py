"""Simulation and research only: the local federation runner, phantoms,
baselines, the canary audit and sample slices. Never in the app bundle a
hospital approves; nothing in client/, server/ or common/ imports it."""
