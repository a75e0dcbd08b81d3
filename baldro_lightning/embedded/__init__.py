"""The embedded offline default: benchmark generators, tiny models and the quickstart."""
