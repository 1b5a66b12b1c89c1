"""Instrument definitions (as data) for ``butler register-instrument``."""
