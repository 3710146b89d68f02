"""e2e tier (README "Tests")."""
