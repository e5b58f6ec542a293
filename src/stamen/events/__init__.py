"""Event ingest: turning Celery's event stream into task and worker records."""
