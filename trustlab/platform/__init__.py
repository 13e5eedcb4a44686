"""Shared machinery. Nothing in this package imports a method by name."""
