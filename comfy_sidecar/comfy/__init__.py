"""Talking to ComfyUI: its HTTP API (client) and its websocket (events)."""
