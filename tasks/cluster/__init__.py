"""How the controller reaches nodes: sessions, nodes, transports, host keys, preflight, fab hooks."""
