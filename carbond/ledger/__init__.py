"""The durable ledger (SQLite, WAL), the budgets that read it, and calendar periods."""
