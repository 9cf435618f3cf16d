"""Simulator of SITS datasets written in the exact real on-disk formats (PASTIS, MTLCC)."""
