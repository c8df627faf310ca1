"""Feature dictionaries for other tools (Neuronpedia, OpenAI neuron-explainer, delphi, Parquet,
JSON) and the self-contained HTML report."""
