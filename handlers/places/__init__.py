"""The places plugin: stay-point detection on streams of GPS fixes (``places:track_location``) and live
encounter events (``places:stream_encounters``). The algorithm is :mod:`.staypoints`; :mod:`.plugin` adapts it."""
