"""Task runners: one attempt of a shell, python or agent task in its work directory."""
