"""The account pool: account state, token claims, refresh (single-flight), selection."""
