"""Who is calling: tenants and users, API keys, tokens, passwords, and roles."""
