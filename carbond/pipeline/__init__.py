"""One tick: meters read under deadlines, device deltas, usage, then `attribution.attribute`."""
