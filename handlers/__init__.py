"""The built-in plugins, installed as ``nexus.handlers``; each registers through the entry points."""
