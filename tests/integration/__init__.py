"""integration tier (README "Tests")."""
