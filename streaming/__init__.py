"""What flows: events, bounded channels, audio utilities, the wire protocol and transport adapters.

This package imports neither ``pipelines`` nor ``server``.
"""
