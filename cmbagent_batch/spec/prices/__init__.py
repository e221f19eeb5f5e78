"""The shipped price table (package data)."""
