"""Configuration: the schema (pydantic), loading from files and the environment,
durations, and reporting (effective config, warnings).

Pure apart from reading the config and secret files. May import relay.errors and
relay.queue's vocabulary.
"""
