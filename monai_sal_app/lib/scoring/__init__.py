"""Scoring methods of the MONAI Label app (``POST /scoring/<method>``)."""
