"""Platform job types; business domains live in their own packages."""
