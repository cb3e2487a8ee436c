"""raymoe package."""
