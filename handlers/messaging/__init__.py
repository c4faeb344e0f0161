"""The messaging plugin: conversations with persistent messages, typing indicators and presence."""
