"""The built-in plugins (installed as ``nexus.handlers``); each registers through the ``nexus.handlers`` entry points."""
