"""The HTTP side: Flower's API and pages, served by FastAPI on uvicorn."""
