"""The conversation core: channel-agnostic turn management over business objects.

This package imports nothing else of the project; adapters implement the ports in
:mod:`pipeline.ports` and ``server.py`` wires them together.
"""
