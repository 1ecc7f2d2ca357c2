"""Engine interfaces (one small Protocol per capability) and their implementations."""
