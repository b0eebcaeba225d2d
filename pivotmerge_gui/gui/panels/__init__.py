"""Panels of the main window (widgets only; they show data computed elsewhere)."""
