"""Local stand-ins for cloud object stores, and a fault-injecting proxy, for tests."""
