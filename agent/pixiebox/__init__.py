"""Pixiebox: boot services and lab control for an ephemeral bare-metal lab."""
