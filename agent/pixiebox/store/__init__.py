"""What must survive a restart or a power cut: the SQLite state (machines, leases, events) and
each machine's stable identity (SSH host key, k3s node password, the lab's agent token).

Imports nothing of pixiebox but `pixiebox.config` (paths and value types) and
`pixiebox.events` (the event record it stores).
"""
