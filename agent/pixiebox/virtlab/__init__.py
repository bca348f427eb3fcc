"""The virtual lab: namespaces, a home router, QEMU machines, and the demo."""
