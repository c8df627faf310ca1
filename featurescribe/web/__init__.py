"""`featurescribe browse`: a local, read-only web app over a database (FastAPI on uvicorn)."""
