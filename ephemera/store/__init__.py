"""The records: every environment and every transition, in PostgreSQL (or SQLite locally)."""
