"""The analytics plugin: event-time windows with watermarks and threshold alerts, and live bus statistics."""
