"""Talking to a running agent from outside: the API client (`api`: JSON calls with the bearer
token, errors in sentences) and the event-stream follower with its live tables (`follow`: the
server-sent events behind `pixiebox power`, `pixiebox lab up` and the demo's boot stages).

Reads events as data (pixiebox.events: kinds and fields). May import pixiebox.events and
pixiebox.config; never the agent's servers, which run in another process.
"""
