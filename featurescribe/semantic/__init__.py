"""Finding features by meaning: label embeddings (`embed`) and semantic search (`search`)."""
