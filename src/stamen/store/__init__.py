"""The history store: the single source of truth that ingest writes and the web reads."""
