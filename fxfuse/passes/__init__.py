"""The pass: every fusion found, chosen and rewritten by one driver."""
