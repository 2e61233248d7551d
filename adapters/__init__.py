"""Toolkit adapters, installed as ``zsq_plugins.adapters``.

Each adapter imports its toolkit lazily and is registered in the ``zsq_plugins.adapters``
entry-point group, so that the core never imports a toolkit.
"""
