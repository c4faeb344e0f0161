"""An example Nexus plugin, installed as its own distribution and found through the ``nexus.handlers`` entry points."""

from nexus_demo_plugin.handlers import Echo, StreamCount, StreamFail, StreamHang, StreamWait

__all__ = ["Echo", "StreamCount", "StreamFail", "StreamHang", "StreamWait"]
