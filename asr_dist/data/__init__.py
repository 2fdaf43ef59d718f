"""Shard sets: building (sources, writer), the on-disk format (index) and checking (verify)."""
