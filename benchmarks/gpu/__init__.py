"""The GPU run: its bundle, the compact model, the fingerprint, speed and result packing."""
