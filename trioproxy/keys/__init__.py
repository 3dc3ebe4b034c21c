"""API keys for a team: policies, budgets, usage accounting and the price table."""
