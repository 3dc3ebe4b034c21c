"""Sans-IO protocol code: no trio import here. Pure functions and small state machines."""
