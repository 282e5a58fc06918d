"""Exporters: each reads the same snapshots (see `samples`) and speaks one protocol."""
