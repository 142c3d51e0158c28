"""The verifier: inputs, runners, metrics, and the driver that compares two models."""
