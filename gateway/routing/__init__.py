"""The routing table: its compiled model, the loader that builds it, and request resolution."""
