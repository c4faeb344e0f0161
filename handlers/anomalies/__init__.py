"""The anomalies plugin: log anomaly scoring (``score_log``, ``stream_log``) and baseline deviation
(``set_baseline``, ``monitor``, ``stream_health``). The algorithms are :mod:`.templates`, :mod:`.logs` and
:mod:`.baseline`; :mod:`.follow` follows files; :mod:`.plugin` adapts them to events."""
