"""Flood generators shared by the endurance tests and the benchmark: standalone scripts run
inside a network namespace (python3 bench/floods/NAME.py ...), each printing one JSON object."""
