"""The demo service: each seed document's anti-pattern and its fix, side by side, under load."""
