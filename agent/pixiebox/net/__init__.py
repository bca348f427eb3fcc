"""Plumbing shared by the protocol servers: the lab interface's addresses and neighbours.

Imports nothing of pixiebox.
"""
