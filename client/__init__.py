"""Clients: the web page (web/), and a Python client library the apps and tests share."""
