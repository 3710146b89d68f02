"""unit tier (README "Tests")."""
