"""featurescribe: label neural-network features with LLM explanations scored by simulation."""

__version__ = "0.1.0"
